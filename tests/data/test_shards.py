import hashlib
import io
import json
import os
import tarfile
import uuid

import numpy as np
import pytest

from musiclm.constants import SHARD_SCHEMA_VERSION
from musiclm.data import shards as sh


def _token_sample(key: str, rng: np.random.Generator, frames: int = 50) -> dict:
    return {
        "__key__": key,
        "json": {"key": key, "source": f"/corpus/{key}.wav", "start": 0.0, "end": 1.0, "caption": "calm piano",
                 "aspects": ["piano"], "tokenizers": {"soundstream": "soundstream:tiny:abc"}, "schema": SHARD_SCHEMA_VERSION},
        "acoustic": rng.integers(0, 1024, size=(frames, 12)).astype(np.int16),
        "semantic": rng.integers(0, 1024, size=(frames // 2,)).astype(np.int16),
        "mulan": rng.integers(0, 1024, size=(12,)).astype(np.int16),
    }


def _samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [_token_sample(sh.sample_key(f"/corpus/clip{seed}-{i}.wav", 10.0 * i), rng) for i in range(n)]


def test_sample_key_is_stable_dotless_and_known():
    key = sh.sample_key("gs://bucket/a.b.c/song.v2.wav", 12.5)
    assert key == sh.sample_key("gs://bucket/a.b.c/song.v2.wav", 12.5)
    assert "." not in key and "/" not in key
    digest = hashlib.sha1(b"gs://bucket/a.b.c/song.v2.wav").hexdigest()[:16]
    assert key == f"{digest}_0000012500"
    assert sh.sample_key("gs://bucket/a.b.c/song.v2.wav", 0.0) != key
    assert sh.sample_key("gs://bucket/other.wav", 12.5) != key
    with pytest.raises(ValueError):
        sh.sample_key("x.wav", -1.0)


def test_shard_index_is_stable_in_range_and_spreads():
    keys = [sh.sample_key(f"/c/{i}.wav", 0.0) for i in range(400)]
    indices = [sh.shard_index(k, 4) for k in keys]
    assert indices == [sh.shard_index(k, 4) for k in keys]
    assert set(indices) == {0, 1, 2, 3}
    assert min(np.bincount(indices)) > 60  # roughly balanced (400 / 4 = 100 each)
    # known answer: not Python's salted hash()
    key = keys[0]
    assert sh.shard_index(key, 7) == int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) % 7
    with pytest.raises(ValueError):
        sh.shard_index(key, 0)


def test_round_trip_through_webdataset(tmp_path):
    samples = _samples(5)
    entry = sh.write_shard(tmp_path / "tokens-000000.tar", samples)
    assert entry["samples"] == 5 and entry["written"]
    sh.write_manifest(str(tmp_path), [entry], kind="tokens")
    got = {s["__key__"]: s for s in sh.iter_samples(str(tmp_path))}
    assert sorted(got) == sorted(s["__key__"] for s in samples)
    for s in samples:
        g = got[s["__key__"]]
        assert g["json"] == s["json"]
        for name in ("acoustic", "semantic", "mulan"):
            assert g[name].dtype == np.int16
            np.testing.assert_array_equal(g[name], s[name])
        assert "melody" not in g and "wav" not in g


def test_tar_members_are_named_by_dotless_key_and_fixed_metadata(tmp_path):
    samples = _samples(2)
    sh.write_shard(tmp_path / "tokens-000000.tar", samples)
    with tarfile.open(tmp_path / "tokens-000000.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    key = min(s["__key__"] for s in samples)
    assert names[:4] == [f"{key}.json", f"{key}.acoustic.npy", f"{key}.semantic.npy", f"{key}.mulan.npy"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
    with pytest.raises(ValueError, match="no '.'"):
        sh.write_shard(tmp_path / "bad.tar", [{"__key__": "a.b", "json": {}}])


def test_reruns_are_byte_identical_and_skip_unchanged_files(tmp_path):
    samples = _samples(6, seed=3)
    a = sh.write_shard(tmp_path / "a.tar", samples)
    b = sh.write_shard(tmp_path / "b.tar", list(reversed(samples)))  # order of arrival does not matter
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a["sha256"] == b["sha256"] == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    inode = os.stat(tmp_path / "a.tar").st_ino
    again = sh.write_shard(tmp_path / "a.tar", samples)
    assert not again["written"] and os.stat(tmp_path / "a.tar").st_ino == inode
    changed = samples[:-1]
    assert sh.write_shard(tmp_path / "a.tar", changed)["written"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_duplicate_keys_are_refused(tmp_path):
    s = _samples(1)
    with pytest.raises(ValueError, match="duplicate"):
        sh.write_shard(tmp_path / "x.tar", s + s)


def test_list_shards_errors_and_manifest_wins_over_stale_files(tmp_path):
    with pytest.raises(sh.ShardError, match="does not exist"):
        sh.list_shards(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sh.ShardError, match="holds no"):
        sh.list_shards(str(tmp_path / "empty"), "tokens")
    e0 = sh.write_shard(tmp_path / "tokens-000000.tar", _samples(2))
    sh.write_shard(tmp_path / "tokens-000001.tar", _samples(2, seed=1))
    assert [os.path.basename(u) for u in sh.list_shards(str(tmp_path), "tokens")] == [
        "tokens-000000.tar", "tokens-000001.tar"]
    manifest = sh.write_manifest(str(tmp_path), [e0], kind="tokens", tokenizers={"mulan": "mulan:tiny:1"})
    assert manifest["schema"] == SHARD_SCHEMA_VERSION and manifest["num_samples"] == 2
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"][0]["sha256"] == e0["sha256"]
    assert [os.path.basename(u) for u in sh.list_shards(str(tmp_path))] == ["tokens-000000.tar"]


def test_dead_letters_and_stats_files(tmp_path):
    records = [sh.dead_letter("/c/z.wav", "empty", "read"), sh.dead_letter("/c/a.wav", "NaN", "read")]
    assert sh.write_dead_letters(str(tmp_path), records) == 2
    lines = (tmp_path / "dead_letter.jsonl").read_text().splitlines()
    assert [json.loads(line)["uri"] for line in lines] == ["/c/a.wav", "/c/z.wav"]
    assert sh.read_dead_letters(str(tmp_path))[0] == {"uri": "/c/a.wav", "reason": "NaN", "stage": "read"}
    sh.write_stats(str(tmp_path), {"files_in": 3})
    assert sh.read_stats(str(tmp_path)) == {"files_in": 3}


def test_shuffle_is_seeded_permutation_and_repeat_cycles(tmp_path):
    for i in range(3):
        sh.write_shard(tmp_path / f"tokens-{i:06d}.tar", _samples(4, seed=10 + i)[i:])
    plain = [s["__key__"] for s in sh.iter_samples(str(tmp_path))]
    shuffled = [s["__key__"] for s in sh.iter_samples(str(tmp_path), shuffle=8, seed=1)]
    assert sorted(shuffled) == sorted(plain) and len(set(plain)) == len(plain)
    assert shuffled != plain
    assert shuffled == [s["__key__"] for s in sh.iter_samples(str(tmp_path), shuffle=8, seed=1)]
    stream = sh.iter_samples(str(tmp_path), repeat=True)
    first = [next(stream)["__key__"] for _ in range(2 * len(plain))]
    assert first == plain + plain


def test_memory_url_round_trip_and_flac_member():
    from musiclm.audio import encode_flac

    base = f"memory://shards-{uuid.uuid4().hex}"
    rng = np.random.default_rng(0)
    wav = (0.3 * np.sin(np.linspace(0, 200, 2400))).astype(np.float32)
    sample = {"__key__": sh.sample_key("memory://c/a.wav", 0.0), "json": {"source": "a"}, "flac": encode_flac(wav, 24000),
              "melody": rng.integers(0, 512, size=(3, 24)).astype(np.int16)}
    entry = sh.write_shard(sh.join_url(base, "audio-000000.tar"), [sample])
    sh.write_manifest(base, [entry], kind="audio")
    (got,) = list(sh.iter_samples(base, prefix="audio"))
    assert got["json"] == {"source": "a"}
    np.testing.assert_array_equal(got["melody"], sample["melody"])
    assert got["wav"].dtype == np.float32 and got["wav"].shape == wav.shape
    np.testing.assert_allclose(got["wav"], wav, atol=1e-4)  # 16-bit FLAC


def test_npy_members_never_unpickle(tmp_path):
    # an object array would need pickle: a tampered shard must not execute anything on load
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    with tarfile.open(tmp_path / "tokens-000000.tar", "w") as tar:
        for name, payload in (("k_1.json", b"{}"), ("k_1.acoustic.npy", data)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="allow_pickle"):
        list(sh.iter_samples([str(tmp_path / "tokens-000000.tar")]))


# ----------------------------------------------------------------------------- which tokenizers made a shard

PAPER_RATES = {"acoustic_frame_rate": 50, "acoustic_codebooks": 12, "acoustic_codebook_size": 1024, "coarse_levels": 4,
               "semantic_frame_rate": 25, "semantic_codebook_size": 1024, "conditioning_codebooks": 12,
               "conditioning_codebook_size": 1024}
OURS_IDS = {"soundstream": "soundstream:tiny:abc", "w2vbert": "w2vbert:tiny:def"}


def _info(acoustic: str = "soundstream", frame_rate: int = 50, codebooks: int = 12) -> dict:
    return {"acoustic": {"backend": acoustic, "version": "1", "ids": {}},
            "semantic": {"backend": "w2vbert", "version": "1", "ids": {"w2vbert": "w2vbert:tiny:def"}},
            "rates": {**PAPER_RATES, "acoustic_frame_rate": frame_rate, "acoustic_codebooks": codebooks}}


def _shard(path, info: dict | None, ids: dict = OURS_IDS, schema: int = SHARD_SCHEMA_VERSION, n: int = 2) -> str:
    samples = _samples(n, seed=len(str(path)))
    for s in samples:
        s["json"] = {**s["json"], "tokenizers": ids, "schema": schema}
        if info is not None:
            s["json"]["token_info"] = info
    sh.write_shard(path, samples)
    return str(path)


def test_first_sample_json_reads_the_first_member_only(tmp_path):
    url = _shard(tmp_path / "tokens-000000.tar", _info(), n=3)
    first = min(s["__key__"] for s in sh.iter_samples(url))
    document = sh.first_sample_json(url)
    assert document["key"] == first and document["token_info"] == _info()
    sh.write_shard(tmp_path / "arrays-000000.tar", [{"__key__": "k0", "mulan": np.zeros(12, np.int16)}])
    assert sh.first_sample_json(str(tmp_path / "arrays-000000.tar")) == {}  # json is always written
    (tmp_path / "broken-000000.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(sh.ShardError, match="broken-000000.tar"):
        sh.first_sample_json(str(tmp_path / "broken-000000.tar"))


def test_shards_of_one_tokenizer_pass_and_give_their_token_info(tmp_path):
    urls = [_shard(tmp_path / f"tokens-{i:06d}.tar", _info("encodec", 75, 8)) for i in range(3)]
    assert sh.check_same_tokenizers(urls) == _info("encodec", 75, 8)
    # old shards (schema 1: tokenizer ids only) mix with new ones made by the same tokenizers
    old = _shard(tmp_path / "old-000000.tar", None, schema=1)
    new = _shard(tmp_path / "new-000000.tar", _info())
    assert sh.check_same_tokenizers([old, new]) == _info()
    assert sh.check_same_tokenizers([old]) is None  # predates token_info: the paper's rates


def test_shards_of_different_tokenizers_are_refused_naming_two_of_them(tmp_path):
    a = _shard(tmp_path / "tokens-000000.tar", _info())
    b = _shard(tmp_path / "tokens-000001.tar", _info())
    c = _shard(tmp_path / "tokens-000002.tar", _info("encodec", 75, 8))
    with pytest.raises(sh.ShardError) as err:
        sh.check_same_tokenizers([a, b, c])
    message = str(err.value)
    assert "\n" not in message and a in message and c in message and b not in message
    assert "rates.acoustic_frame_rate 50 vs 75" in message and "acoustic.backend 'soundstream' vs 'encodec'" in message
    # old shards are compared by their tokenizer ids
    old = _shard(tmp_path / "old-000000.tar", None, schema=1)
    other = _shard(tmp_path / "old-000001.tar", None, ids={**OURS_IDS, "soundstream": "soundstream:tiny:xyz"}, schema=1)
    with pytest.raises(sh.ShardError, match="tokenizer ids: soundstream 'soundstream:tiny:abc' vs 'soundstream:tiny:xyz'"):
        sh.check_same_tokenizers([old, other])
    with pytest.raises(sh.ShardError, match="tokenizer ids"):  # an EnCodec shard is not an old SoundStream one
        sh.check_same_tokenizers([old, _shard(tmp_path / "enc-000000.tar", _info("encodec", 75, 8), ids={"encodec": "e"})])
    newer = _shard(tmp_path / "newer-000000.tar", _info(), schema=SHARD_SCHEMA_VERSION + 1)
    with pytest.raises(sh.ShardError, match="newer than this musiclm"):
        sh.check_same_tokenizers([a, newer])
