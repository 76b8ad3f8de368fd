"""Caption manifests: captions.jsonl and MusicCaps CSV."""

import json
import uuid

import fsspec
import pytest

from musiclm.data.captions import caption_for, load_captions, normalize_aspects, parse_aspects, stem

MUSICCAPS_CSV = (
    "ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval\n"
    '-0Gj8-vB1q4,30,40,"/m/0140xf,/m/02cjck","[\'low quality\', \'sustained strings melody\', \'soft female vocal\']",'
    '"The low quality recording features a ballad song.",4,False,True\n'
    "-0SdAVK79lg,30,40,/m/0155w,\"['guitar song', \"\"player's solo\"\"]\",\"This song features an electric guitar.\",0,True,False\n"
    "abc123,0,10,/m/0,not a list at all,\"Plain caption, with a comma.\",1,False,False\n"
)


def test_musiccaps_csv(tmp_path):
    path = tmp_path / "musiccaps-public.csv"
    path.write_text(MUSICCAPS_CSV)
    caps = load_captions(str(path))
    assert set(caps) == {"-0Gj8-vB1q4", "-0SdAVK79lg", "abc123"}
    assert caps["-0Gj8-vB1q4"]["aspects"] == ["low quality", "sustained strings melody", "soft female vocal"]
    assert caps["-0Gj8-vB1q4"]["caption"] == "The low quality recording features a ballad song."
    assert caps["-0SdAVK79lg"]["aspects"] == ["guitar song", "player's solo"]
    assert caps["abc123"]["aspects"] == ["not a list at all"]  # fallback: comma split
    assert caption_for(caps, "gs://bucket/musiccaps/-0SdAVK79lg.wav")["caption"].startswith("This song")


def test_jsonl_by_id_or_file_stem():
    url = f"memory://captions-{uuid.uuid4().hex}/captions.jsonl"
    lines = [
        {"file": "audio/clip_00000.wav", "id": "clip_00000", "caption": "A techno track.", "aspects": ["techno"]},
        {"file": "audio/clip_00001.wav", "caption": "A jazz piece.", "aspects": ["jazz", "swing"]},
    ]
    with fsspec.open(url, "w") as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n\n")
    caps = load_captions(url)
    assert caps == {
        "clip_00000": {"caption": "A techno track.", "aspects": ["techno"]},
        "clip_00001": {"caption": "A jazz piece.", "aspects": ["jazz", "swing"]},
    }
    assert caption_for(caps, "/data/corpus/audio/clip_00001.wav")["aspects"] == ["jazz", "swing"]
    assert caption_for(caps, "memory://x/clip_99999.flac") is None


def test_bad_manifests(tmp_path):
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"caption": "no id"}\n')
    with pytest.raises(ValueError, match="neither"):
        load_captions(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="not a JSON line"):
        load_captions(str(bad))
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("name,text\na,b\n")
    with pytest.raises(ValueError, match="ytid"):
        load_captions(str(csv_path))


def test_parse_aspects_is_safe():
    assert parse_aspects("['a', 'b']") == ["a", "b"]
    assert parse_aspects(["x ", ""]) == ["x"]
    assert parse_aspects("") == [] and parse_aspects(None) == []
    # literal_eval never runs code: a call expression falls back to splitting
    assert parse_aspects("[__import__('os').system('echo hi')]") == ["__import__('os').system('echo hi')"]


def test_stem():
    assert stem("gs://b/dir/clip_00001.wav") == "clip_00001"
    assert stem("my.song.flac") == "my.song"
    assert stem("memory://a/b/xyz.ogg?generation=3") == "xyz"


def test_normalize_aspects_spells_the_vocabulary_one_way():
    assert normalize_aspects("['Low quality', 'low  quality ', 'Soft female vocal', '']") == [
        "low quality", "soft female vocal"]
    assert normalize_aspects(["Techno", "techno", "128 BPM"]) == ["techno", "128 bpm"]
    assert normalize_aspects(None) == [] and normalize_aspects("") == []


def test_jsonl_rows_keep_their_melody_group(tmp_path):
    path = tmp_path / "captions.jsonl"
    rows = [
        {"file": "audio/m_00.wav", "caption": "A hum.", "aspects": ["humming"], "melody_group": "melody_0000"},
        {"audio": "gs://b/covers/m_01.flac", "melody_group": " song 7 "},  # a melody-pairs manifest row
        {"file": "audio/plain.wav", "caption": "No group."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    caps = load_captions(str(path))
    assert caps["m_00"] == {"caption": "A hum.", "aspects": ["humming"], "melody_group": "melody_0000"}
    assert caps["m_01"] == {"caption": "", "aspects": [], "melody_group": "song 7"}
    assert "melody_group" not in caps["plain"]
    for bad in ("", "   ", None, ["x"]):
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"file": "b.wav", "melody_group": bad}) + "\n")
        with pytest.raises(ValueError, match=r"captions.jsonl:2: 'melody_group' is empty"):
            load_captions(str(path))
    path.write_text('["a.wav"]\n')
    with pytest.raises(ValueError, match=":1: a record must be a JSON object"):
        load_captions(str(path))
