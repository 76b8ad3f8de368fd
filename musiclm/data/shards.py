"""WebDataset shards: the one on-disk format between tokenization (Beam) and training (Ray).

A shard is a plain tar ``NAME-000000.tar`` holding one sample per crop window. Every member of
a sample is named ``KEY.EXT``; keys contain no dot (``ray.data.read_webdataset`` and
WebDataset both split the member name at the first dot). Token samples carry

    KEY.json           source URI, window start/end (s), caption, aspects, schema, tokenizer ids
                       (``tokenizers``) and ``token_info`` (backends, versions, ids, token rates)
    KEY.acoustic.npy   int16 [F, K]    acoustic codes (SoundStream 50 Hz x 12; EnCodec 75 Hz x 8)
    KEY.semantic.npy   int16 [F_s]     semantic tokens, 25 Hz
    KEY.mulan.npy      int16 [12]      conditioning tokens M_A
    KEY.melody.npy     int16 [..]      melody tokens (when present)
    KEY.contour.npy    int8 [F_s]      melody contour, the pitch class of each 40-ms frame (with melody tokens)

and audio samples (for tokenizer training) carry ``KEY.json`` + ``KEY.flac`` (24 kHz mono).

Shards are written deterministically (members sorted by key, fixed mtime/uid/gid/mode, arrays
through ``np.save``, JSON with sorted keys), so rerunning a job writes byte-identical files; a
shard whose file already holds the same bytes is left untouched, which makes jobs resumable.
Next to the shards live ``manifest.json`` (shards, sample counts, sha256), ``dead_letter.jsonl``
(every input that was not tokenized, with the reason) and ``stats.json``.

Only numpy, JSON and FLAC are stored: nothing is ever unpickled (``allow_pickle=False``).

Schema versions: 1 (issue 2) had no ``token_info`` and always SoundStream's 50 Hz x 12 tokens; 2 adds
``token_info`` and lets ``acoustic`` have the backend's shape. Version-1 shards still train: they
are read as the paper's rates, and two shards are compared by their ``tokenizers`` ids when either
lacks ``token_info``. Shards of a newer schema than this code knows are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np

from musiclm.constants import SHARD_SCHEMA_VERSION

MANIFEST_FILE = "manifest.json"
DEAD_LETTER_FILE = "dead_letter.jsonl"
STATS_FILE = "stats.json"

TOKEN_SHARD_PREFIX = "tokens"
AUDIO_SHARD_PREFIX = "audio"

# array members, in the order they are written; "wav" is carried as "flac"
ARRAY_MEMBERS = ("acoustic", "semantic", "mulan", "melody", "contour")

_FIXED_MTIME = 0  # 1970-01-01: reruns give byte-identical tars


class ShardError(Exception):
    """A shard folder or file is missing, empty or malformed."""


# ----------------------------------------------------------------------------- keys


def sample_key(source_uri: str, start_seconds: float) -> str:
    """A stable key for (source file, window start): ``<16 hex of sha1(uri)>_<start ms, 10 digits>``.

    No dots (WebDataset and Ray split member names at the first dot) and no dependence on the
    process (Python's ``hash()`` is salted per process), so reruns and other workers agree.
    """
    if start_seconds < 0:
        raise ValueError(f"window start must be >= 0, got {start_seconds}")
    digest = hashlib.sha1(source_uri.encode("utf-8")).hexdigest()[:16]
    return f"{digest}_{int(round(start_seconds * 1000)):010d}"


def shard_index(key: str, num_shards: int) -> int:
    """The shard a key belongs to: a stable hash of the key modulo ``num_shards``."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % num_shards


def shard_name(prefix: str, index: int) -> str:
    """``prefix-000000.tar``: the WebDataset naming the readers expect."""
    return f"{prefix}-{index:06d}.tar"


# ----------------------------------------------------------------------------- paths (local or fsspec)


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join_url(base: str, name: str) -> str:
    """``base/name`` for local paths and fsspec URLs alike."""
    return base.rstrip("/") + "/" + name


def is_local_url(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _sha256_of(url: str) -> str | None:
    fs, path = _fs(url)
    if not fs.exists(path):
        return None
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to a temporary name beside ``url``, then rename into place.

    A reader never sees a half-written file; on object stores (no atomic rename) ``mv`` is a copy
    and delete, still never a partial object under the final name.
    """
    fs, path = _fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}" if parent else f".tmp-{uuid.uuid4().hex}"
    if is_local_url(url):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)


# ----------------------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _json_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def sample_members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The tar members ``(name, bytes)`` of one sample dict (``__key__``, ``json``, arrays, ``flac``/``wav``)."""
    key = sample["__key__"]
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    members = [(f"{key}.json", _json_bytes(sample.get("json", {})))]
    for name in ARRAY_MEMBERS:
        if sample.get(name) is not None:
            members.append((f"{key}.{name}.npy", _npy_bytes(np.asarray(sample[name]))))
    if sample.get("flac") is not None:
        members.append((f"{key}.flac", bytes(sample["flac"])))
    elif sample.get("wav") is not None:
        from musiclm.audio import encode_flac
        from musiclm.constants import SAMPLE_RATE

        members.append((f"{key}.flac", encode_flac(np.asarray(sample["wav"], dtype=np.float32), SAMPLE_RATE)))
    return members


def shard_bytes(samples: Iterable[dict[str, Any]]) -> tuple[bytes, int]:
    """A deterministic tar of the samples (sorted by key). Returns (tar bytes, number of samples)."""
    ordered = sorted(samples, key=lambda s: s["__key__"])
    keys = [s["__key__"] for s in ordered]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate sample keys in one shard")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in ordered:
            for name, data in sample_members(sample):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = _FIXED_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), len(ordered)


def write_shard(path_or_url: str | os.PathLike, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write one shard (temporary name, then rename); skip the write when the file already holds these bytes.

    Returns the manifest entry ``{"name", "samples", "sha256", "bytes", "written"}``; ``written`` is
    False when an identical file was already there (a resumed or repeated run).
    """
    url = str(path_or_url)
    data, count = shard_bytes(samples)
    sha = hashlib.sha256(data).hexdigest()
    written = _sha256_of(url) != sha
    if written:
        write_bytes_atomic(url, data)
    return {"name": url.rstrip("/").rsplit("/", 1)[-1], "samples": count, "sha256": sha, "bytes": len(data), "written": written}


# ----------------------------------------------------------------------------- manifest, dead letters, stats


def write_manifest(
    out_dir: str,
    shards: Iterable[dict[str, Any]],
    *,
    kind: str,
    tokenizers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``manifest.json``: the shards (sorted by name) with sample counts and sha256, tokenizer ids, schema."""
    entries = sorted(
        ({k: s[k] for k in ("name", "samples", "sha256", "bytes")} for s in shards), key=lambda s: s["name"]
    )
    manifest = {
        "schema": SHARD_SCHEMA_VERSION,
        "kind": kind,
        "num_shards": len(entries),
        "num_samples": sum(e["samples"] for e in entries),
        "shards": entries,
        "tokenizers": dict(sorted((tokenizers or {}).items())),
        **(extra or {}),
    }
    write_bytes_atomic(join_url(out_dir, MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` of a shard folder, or None when there is none."""
    fs, path = _fs(join_url(out_dir, MANIFEST_FILE))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def dead_letter(uri: str, reason: str, stage: str) -> dict[str, str]:
    """One dead-letter record: the input, why it was not used, and in which step."""
    return {"uri": uri, "reason": reason, "stage": stage}


def write_dead_letters(out_dir: str, records: Iterable[dict[str, str]]) -> int:
    """``dead_letter.jsonl``: one JSON line per input not tokenized, sorted (reruns write the same file)."""
    lines = sorted(json.dumps(r, sort_keys=True) for r in records)
    write_bytes_atomic(join_url(out_dir, DEAD_LETTER_FILE), "".join(line + "\n" for line in lines).encode())
    return len(lines)


def read_dead_letters(out_dir: str) -> list[dict[str, str]]:
    fs, path = _fs(join_url(out_dir, DEAD_LETTER_FILE))
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def write_stats(out_dir: str, stats: dict[str, Any]) -> None:
    write_bytes_atomic(join_url(out_dir, STATS_FILE), json.dumps(stats, indent=2, sort_keys=True).encode())


def read_stats(out_dir: str) -> dict[str, Any]:
    fs, path = _fs(join_url(out_dir, STATS_FILE))
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


# ----------------------------------------------------------------------------- reading


def list_shards(data_dir: str | os.PathLike, prefix: str | None = None) -> list[str]:
    """The shard URLs of a folder, sorted: those named in ``manifest.json`` when there is one
    (stale tars of earlier runs are ignored), else every ``PREFIX-*.tar``.

    Raises ShardError naming the folder when it holds no shards.
    """
    base = str(data_dir)
    fs, path = _fs(base)
    if not fs.isdir(path):
        raise ShardError(f"shard folder {base} does not exist (run `musiclm tokenize` or `musiclm prepare-audio` first)")
    manifest = read_manifest(base)
    if manifest is not None:
        names = [s["name"] for s in manifest["shards"]]
        if prefix is not None:
            names = [n for n in names if n.startswith(prefix + "-")]
    else:
        pattern = f"{prefix}-*.tar" if prefix else "*.tar"
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(path.rstrip("/") + "/" + pattern))
    if not names:
        what = f"'{prefix}-*.tar' shards" if prefix else "shards (*.tar)"
        raise ShardError(f"{base} holds no {what}: point at the output folder of `musiclm tokenize` / `prepare-audio`")
    return [base.rstrip("/") + "/" + n if not is_local_url(base) else str(Path(path) / n) for n in sorted(names)]


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    """WebDataset opener for any fsspec URL (memory://, gs:// through gcsfs, s3://, ...)."""
    return fsspec.open(url, mode).open()


_WDS_NATIVE = {"", "file", "pipe", "http", "https", "sftp", "ftps", "scp", "ais", "hf", "htgs"}


def _register_fsspec_schemes(urls: Sequence[str]) -> None:
    import webdataset as wds

    for url in urls:
        scheme = urlparse(url).scheme
        if scheme not in _WDS_NATIVE and not (len(scheme) == 1 and os.name == "nt"):
            wds.gopen_schemes[scheme] = _fsspec_gopen


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """WebDataset's raw ``{"__key__", "json": bytes, "acoustic.npy": bytes, ...}`` -> decoded arrays."""
    out: dict[str, Any] = {"__key__": raw["__key__"]}
    if "__url__" in raw:
        out["__url__"] = raw["__url__"]
    if "json" in raw:
        out["json"] = json.loads(raw["json"])
    for name in ARRAY_MEMBERS:
        data = raw.get(f"{name}.npy")
        if data is not None:
            out[name] = np.load(io.BytesIO(data), allow_pickle=False)
    if raw.get("flac") is not None:
        from musiclm.audio import decode_audio_bytes

        out["wav"] = decode_audio_bytes(raw["flac"])
    return out


def _no_split(src):
    yield from src


def iter_samples(
    data_dir_or_urls: str | os.PathLike | Sequence[str],
    *,
    shuffle: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    seed: int = 0,
    repeat: bool = False,
    prefix: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples ``{"__key__", "json", "acoustic", "semantic", "mulan", "melody", "wav"}`` (what is present).

    ``data_dir_or_urls``: a shard folder (local or fsspec URL) or a list of shard URLs.
    ``shuffle`` > 0 shuffles the shard order and keeps a sample buffer of that size (seeded).
    Shards are split across torch.distributed ranks (``split_by_node``) and DataLoader workers
    (``split_by_worker``): give at least ranks x workers shards, or some readers get nothing.
    """
    import webdataset as wds

    if isinstance(data_dir_or_urls, (str, os.PathLike)):
        text = str(data_dir_or_urls)
        urls = [text] if text.endswith(".tar") else list_shards(text, prefix)
    else:
        urls = [str(u) for u in data_dir_or_urls]
        if not urls:
            raise ShardError("no shard URLs given")
    _register_fsspec_schemes(urls)
    dataset = wds.WebDataset(
        urls,
        nodesplitter=wds.split_by_node if split_by_node else _no_split,
        workersplitter=wds.split_by_worker if split_by_worker else None,
        shardshuffle=len(urls) if shuffle > 0 else False,
        detshuffle=True,
        seed=seed,
        empty_check=False,
    )
    if shuffle > 0:
        dataset = dataset.shuffle(shuffle, rng=random.Random(seed))
    while True:
        count = 0
        for raw in dataset:  # each pass is one epoch; detshuffle reseeds the shard order per epoch
            count += 1
            yield decode_sample(raw)
        if not repeat or count == 0:  # a reader given no shards must not spin forever
            return


# ----------------------------------------------------------------------------- which tokenizers made a shard


def first_sample_json(url: str) -> dict[str, Any] | None:
    """The ``json`` member of a shard's first sample (reads only the tar's first members), or None."""
    try:
        with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            first_key = None
            for member in tar:
                key, dot, suffix = member.name.rsplit("/", 1)[-1].partition(".")
                if not dot:
                    continue
                if first_key is None:
                    first_key = key
                elif key != first_key:
                    return None
                if suffix == "json":
                    data = tar.extractfile(member)
                    return json.loads(data.read()) if data is not None else None
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise ShardError(f"{url} cannot be read as a shard: {exc}") from exc
    return None


def tokenizer_record(document: dict[str, Any] | None) -> dict[str, Any]:
    """What identifies the tokenizers of a sample: ``{"token_info": ...}`` (schema 2) or, for older
    samples, ``{"tokenizers": ids}``."""
    document = document or {}
    if document.get("token_info") is not None:
        return {"token_info": document["token_info"]}
    return {"tokenizers": document.get("tokenizers")}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    return {prefix: value}


def describe_difference(a: dict[str, Any] | None, b: dict[str, Any] | None, limit: int = 3) -> str:
    """``acoustic.backend 'soundstream' vs 'encodec'; rates.acoustic_frame_rate 50 vs 75`` (first ``limit``)."""
    fa, fb = _flatten(a or {}), _flatten(b or {})
    # the rates and the backends say most: list them before ids and versions
    keys = sorted(set(fa) | set(fb), key=lambda k: (not k.startswith("rates"), "backend" not in k, k))
    diffs = [f"{k} {fa.get(k, 'missing')!r} vs {fb.get(k, 'missing')!r}" for k in keys if fa.get(k) != fb.get(k)]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def check_same_tokenizers(urls: Sequence[str], max_workers: int = 16) -> dict[str, Any] | None:
    """Refuse shards made by different tokenizers (or by a newer schema) with a one-line ShardError
    naming two shards and what differs; read only the first sample's ``json`` of every shard.

    Returns the shards' common ``token_info``, or None when they predate it (the paper's rates).
    Shards with ``token_info`` are compared by it; where either lacks it, by the ``tokenizers`` ids.
    """
    from concurrent.futures import ThreadPoolExecutor

    urls = list(urls)
    if not urls:
        return None
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(urls)))) as pool:
        documents = list(pool.map(first_sample_json, urls))
    for url, document in zip(urls, documents):
        schema = (document or {}).get("schema", 1)
        if isinstance(schema, int) and schema > SHARD_SCHEMA_VERSION:
            raise ShardError(
                f"{url} has shard schema {schema}, newer than this musiclm's {SHARD_SCHEMA_VERSION}: upgrade musiclm"
            )
    records = [(url, document or {}) for url, document in zip(urls, documents)]
    with_info = [(url, d) for url, d in records if d.get("token_info") is not None]
    # token_info where shards have it; the tokenizer ids between every shard (old shards have only those)
    for key, group, what in (("token_info", with_info, "token_info"), ("tokenizers", records, "tokenizer ids")):
        if not group:
            continue
        ref_url, ref = group[0]
        for url, document in group[1:]:
            if document.get(key) != ref.get(key):
                raise ShardError(
                    f"{ref_url} and {url} were made by different tokenizers ({what}: "
                    f"{describe_difference(ref.get(key), document.get(key))}): train a stage on the shards of one "
                    "tokenizer folder (re-tokenize, or point --data at one job's output)"
                )
    return with_info[0][1]["token_info"] if with_info else None
