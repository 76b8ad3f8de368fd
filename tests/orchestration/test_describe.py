import json

from musiclm.orchestration.cli import main
from musiclm.orchestration.describe import describe, format_description


def test_paper_preset_has_the_papers_numbers():
    info = describe("paper")
    c = info["components"]
    assert info["sample_rate"] == 24000
    assert c["soundstream"]["tokens"] == {
        "frame_rate_hz": 50, "codebooks": 12, "codebook_size": 1024, "tokens_per_second": 600, "bitrate_bps": 6000,
    }
    assert c["w2vbert"]["tokens"]["frame_rate_hz"] == 25 and c["w2vbert"]["tokens"]["codebook_size"] == 1024
    assert 550e6 < c["w2vbert"]["parameters"] < 650e6  # "600M-parameter w2v-BERT"
    assert c["mulan"]["tokens"]["codebooks"] == 12 and c["mulan"]["tokens"]["embedding_dim"] == 128
    assert 20e6 < c["mulan"]["parameters_by_tower"]["audio_tower"] < 26e6  # ResNet-50
    for stage, crop in (("semantic", 30), ("coarse", 10), ("fine", 3)):
        comp = c[f"stage_{stage}"]
        assert 400e6 < comp["parameters"] < 450e6  # "430M parameters per stage"
        assert comp["crop_seconds"] == crop
        t = comp["config"]["transformer"]
        assert (t["n_layers"], t["n_heads"], t["dim"], t["ff_dim"], t["dropout"]) == (24, 16, 1024, 4096, 0.1)
    assert [c[f"stage_{s}"]["sampling_temperature"] for s in ("semantic", "coarse", "fine")] == [1.0, 0.95, 0.4]


def test_tiny_keeps_the_token_rates_and_is_small(capsys):
    info = describe("tiny")
    assert info["components"]["soundstream"]["tokens"]["tokens_per_second"] == 600
    assert all(comp["parameters"] < 30e6 for comp in info["components"].values())
    text = format_description(info)
    assert "50 Hz × 12 × 1024" in text and "stage_coarse" in text
    assert main(["describe", "--preset", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "tiny"
