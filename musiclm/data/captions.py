"""Caption manifests: the demo corpus's ``captions.jsonl`` and MusicCaps' CSV.

Tokenization attaches each clip's caption and aspect list to its shard samples (MuLan trains on
them; evaluation prompts come from them), and its ``melody_group`` where the row has one (the
melody embedder's triplets; a melody-pairs manifest, ``musiclm.data.melody_pairs``, is a captions
file whose rows name their clip by ``audio``). Clips are matched by *stem*: ``gs://bucket/x/abc.flac``,
``abc.wav`` and the MusicCaps ``ytid`` ``abc`` all name clip ``abc``.
"""

from __future__ import annotations

import ast
import csv
import io
import json
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec

__all__ = ["caption_for", "jsonl_records", "load_captions", "normalize_aspects", "parse_aspects", "stem"]


def stem(uri: str) -> str:
    """The file name of a path or URL without folders, query or (last) extension."""
    return PurePosixPath(str(uri).split("?", 1)[0].rstrip("/")).stem


def parse_aspects(value: object) -> list[str]:
    """MusicCaps' ``aspect_list`` (a Python-list-like string) or a JSON list as a list of strings.

    ``ast.literal_eval`` only evaluates literals (never code); anything that is not a list literal
    falls back to splitting on commas.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    if not text:
        return []
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        parsed = None
    if isinstance(parsed, (list, tuple)):
        return [str(v).strip() for v in parsed if str(v).strip()]
    return [part.strip().strip("'\"") for part in text.strip("[]").split(",") if part.strip().strip("'\"")]


def normalize_aspects(value: object) -> list[str]:
    """The aspect vocabulary's spelling of an aspect list (as :func:`parse_aspects` reads it): lower case,
    inner whitespace collapsed, duplicates dropped, order kept. MusicCaps writes "Low quality" and
    "low quality" for one aspect; zero-shot tagging must count them as one tag."""
    return list(dict.fromkeys(a for a in (" ".join(str(x).lower().split()) for x in parse_aspects(value)) if a))


def jsonl_records(text: str, source: str, noun: str = "record") -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-empty line of a JSONL manifest; a line that is not a JSON object
    is a ValueError naming ``source:line``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{number}: not a JSON line ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{source}:{number}: a {noun} must be a JSON object, got {type(record).__name__}")
        yield number, record


def _from_jsonl(text: str, source: str) -> dict[str, dict]:
    captions: dict[str, dict] = {}
    for number, record in jsonl_records(text, source):
        path = record.get("file") or record.get("audio")  # "audio": a melody-pairs manifest row
        key = record.get("id") or (stem(path) if path else None)
        if not key:
            raise ValueError(f"{source}:{number}: record has neither 'id' nor 'file' (or 'audio')")
        entry = {"caption": str(record.get("caption") or ""), "aspects": parse_aspects(record.get("aspects"))}
        if "melody_group" in record:
            group = record["melody_group"]
            if group is None or isinstance(group, (dict, list, bool)) or not str(group).strip():
                raise ValueError(f"{source}:{number}: 'melody_group' is empty (rows sharing one share a melody)")
            entry["melody_group"] = str(group).strip()
        captions[str(key)] = entry
    return captions


def _from_csv(text: str, source: str) -> dict[str, dict]:
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or [])
    id_field = next((f for f in ("ytid", "id", "file") if f in fields), None)
    if id_field is None or "caption" not in fields:
        raise ValueError(f"{source}: a caption CSV needs a 'ytid' (or 'id'/'file') and a 'caption' column")
    captions: dict[str, dict] = {}
    for row in reader:
        key = stem(row[id_field]) if id_field == "file" else str(row[id_field]).strip()
        if key:
            captions[key] = {"caption": row["caption"].strip(), "aspects": parse_aspects(row.get("aspect_list"))}
    return captions


def load_captions(path_or_url: str) -> dict[str, dict]:
    """``{clip id: {"caption": str, "aspects": list[str]}}`` from a ``captions.jsonl`` or MusicCaps CSV;
    entries of JSONL rows with a ``"melody_group"`` also carry it (a non-empty string)."""
    with fsspec.open(str(path_or_url), "r", encoding="utf-8") as f:
        text = f.read()
    if str(path_or_url).lower().split("?", 1)[0].endswith(".csv"):
        return _from_csv(text, str(path_or_url))
    return _from_jsonl(text, str(path_or_url))


def caption_for(captions: dict[str, dict], uri: str) -> dict | None:
    """The caption entry of a source URI (matched by file stem), or None."""
    return captions.get(stem(uri))
