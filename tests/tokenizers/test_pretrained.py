"""Pretrained backends: tiny random-weight EnCodec, HuBERT, w2v-BERT 2.0 and CLAP written with
``save_pretrained`` and loaded through ``backends.json``, as a user's would be."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from musiclm.checkpoint import CheckpointError
from musiclm.tokenizers import backends, pretrained
from musiclm.tokenizers.backends import BackendSpec

ROLE = {"encodec": "acoustic", "hubert": "semantic", "w2v-bert-2.0": "semantic", "clap": "conditioner"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU OpenMP's spinning threads
    make them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny folder per backend, shared by the module (each test copies before altering one)."""
    root = tmp_path_factory.mktemp("pretrained")
    return {name: pretrained.save_random_backend(name, root / name, "tiny") for name in ROLE}


def ckpt_with(tmp_path, backend, path, **options):
    """A tokenizer folder whose backends.json names ``backend`` for its role."""
    role = ROLE[backend]
    backends.write_backends(tmp_path / "ckpt", {role: BackendSpec(role, backend, str(path), options)})
    return tmp_path / "ckpt"


def noise(batch, samples, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 0.1, (batch, samples)).astype(np.float32))


# --------------------------------------------------------------------------- EnCodec


def test_encodec_tokens_at_75_hz_match_the_models_own_encode_and_decode(models, tmp_path):
    codec = backends.load_acoustic(ckpt_with(tmp_path, "encodec", models["encodec"]))
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (
        24000,
        75,
        8,
        1024,
    )
    wav = noise(2, 24000 + 123)  # not a whole number of frames: cut to 75
    codes = codec.encode(wav)
    assert codes.shape == (2, 8, 75) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 1024 and codes.unique().numel() > 8
    assert torch.equal(codes, codec.encode(wav))  # deterministic
    reference = codec.model.encode(wav[:, None, : 75 * 320], bandwidth=6.0)
    assert torch.equal(codes, reference.audio_codes[0])
    audio = codec.decode(codes)
    assert audio.shape == (2, 75 * 320)
    expected = codec.model.decode(reference.audio_codes, reference.audio_scales).audio_values[:, 0]
    torch.testing.assert_close(audio, expected)
    with pytest.raises(ValueError, match="shorter than one EnCodec frame"):
        codec.encode(noise(1, 100))
    with pytest.raises(ValueError, match=r"codes \[B, 8, F\]"):
        codec.decode(codes[:, :4])


def test_encodec_bandwidth_sets_the_codebooks_and_rates(models, tmp_path):
    codec = backends.load_acoustic(ckpt_with(tmp_path, "encodec", models["encodec"], bandwidth=3.0))
    assert codec.num_codebooks == 4 and codec.encode(noise(1, 3200)).shape == (1, 4, 10)
    rates = backends.token_rates(tmp_path / "ckpt")
    assert (rates.acoustic_frame_rate, rates.acoustic_codebooks, rates.coarse_levels, rates.acoustic_hop) == (
        75,
        4,
        3,
        320,
    )
    with pytest.raises(ValueError, match="not one of this model's"):
        backends.load_acoustic(ckpt_with(tmp_path, "encodec", models["encodec"], bandwidth=5.0))
    with pytest.raises(ValueError, match="unknown option"):
        backends.load_acoustic(ckpt_with(tmp_path, "encodec", models["encodec"], layer=3))


def test_encodec_other_than_24_khz_is_refused(models, tmp_path):
    folder = shutil.copytree(models["encodec"], tmp_path / "encodec_48khz")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sampling_rate": 48000}))
    with pytest.raises(CheckpointError, match="holds a 48000 Hz EnCodec; only the 24 kHz model fits"):
        backends.load_acoustic(ckpt_with(tmp_path, "encodec", folder))


# --------------------------------------------------------------------------- HuBERT / w2v-BERT 2.0


@pytest.mark.parametrize("backend", ["hubert", "w2v-bert-2.0"])
def test_semantic_features_are_the_chosen_layer_pooled_to_25_hz(models, tmp_path, backend):
    from transformers import HubertModel, Wav2Vec2BertModel

    model = backends.load_semantic_features(ckpt_with(tmp_path, backend, models[backend]))
    assert model.layer == pretrained.default_layer(backend, 4) == {"hubert": 2, "w2v-bert-2.0": 3}[backend]
    wav = noise(2, 960 * 30 + 500)
    features = model.features(wav)
    assert features.shape == (2, 30, model.feature_dim) and model.feature_dim == 32
    assert torch.equal(features, model.features(wav))
    # batch-independent
    torch.testing.assert_close(model.features(wav[1:]), features[1:], atol=1e-5, rtol=1e-4)

    # the same inputs through the whole, untruncated model: hidden_states[layer], averaged in pairs
    cls = HubertModel if backend == "hubert" else Wav2Vec2BertModel
    full = cls.from_pretrained(str(models[backend]), local_files_only=True).eval()
    wav16 = pretrained.resample(wav[:, : 30 * 960], 24000, 16000)
    with torch.no_grad():
        hidden = full(**model._inputs(wav16), output_hidden_states=True).hidden_states[model.layer]
    assert hidden.shape[1] == 60  # 50 Hz, exactly twice the semantic frames
    torch.testing.assert_close(features, hidden.view(2, 30, 2, -1).mean(2), atol=1e-5, rtol=1e-4)

    first = backends.load_semantic_features(ckpt_with(tmp_path, backend, models[backend], layer=1))
    assert not torch.allclose(first.features(wav), features)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[1, 4\]"):
        backends.load_semantic_features(ckpt_with(tmp_path, backend, models[backend], layer=5))
    with pytest.raises(ValueError, match="shorter than one semantic frame"):
        model.features(noise(1, 900))


def test_w2v_bert_without_its_feature_extractor_is_refused(models, tmp_path):
    folder = shutil.copytree(models["w2v-bert-2.0"], tmp_path / "w2v")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        backends.load_semantic_features(ckpt_with(tmp_path, "w2v-bert-2.0", folder))


# --------------------------------------------------------------------------- CLAP


def test_clap_audio_is_the_mean_over_10_s_windows_and_text_is_embedded(models, tmp_path):
    towers = backends.load_conditioner_towers(ckpt_with(tmp_path, "clap", models["clap"]))
    assert towers.embedding_dim == 32
    # 11 s: windows at 0 and 1 s; only the second hears the last second's tone
    wav = noise(1, 24000 * 11) * 0.1
    wav[0, 240000:] += 0.5 * torch.sin(2 * torch.pi * 440 * torch.arange(24000) / 24000)
    emb = towers.embed_audio(wav)
    assert emb.shape == (1, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1))
    windows = torch.cat([towers.embed_audio(wav[:, s * 24000 : (s + 10) * 24000]) for s in range(2)])
    mean = torch.nn.functional.normalize(windows.mean(0, keepdim=True), dim=-1)
    # (resampling the slices apart changes their edges a little)
    torch.testing.assert_close(emb, mean, atol=2e-4, rtol=1e-3)
    assert (emb - windows[:1]).abs().max() > 5e-4  # not just the first window (random towers vary little)
    short = noise(2, 24000 * 2, seed=1)
    both = towers.embed_audio(short)
    # batch-independent
    torch.testing.assert_close(towers.embed_audio(short[1:]), both[1:], atol=1e-5, rtol=1e-4)

    texts = ["a calm piano melody", "heavy metal with loud drums"]
    text = towers.embed_text(texts)
    assert text.shape == (2, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert torch.equal(text, towers.embed_text(texts)) and not torch.allclose(text[0], text[1])
    with pytest.raises(TypeError, match="list of strings"):
        towers.embed_text("one string")


# --------------------------------------------------------------------------- refusals and ids


def test_a_missing_folder_or_one_of_another_model_is_refused(models, tmp_path):
    with pytest.raises(CheckpointError, match="model folder .*nowhere does not exist"):
        backends.load_acoustic(ckpt_with(tmp_path, "encodec", tmp_path / "nowhere"))
    with pytest.raises(
        CheckpointError, match=r"^backends.json names encodec but .*hubert holds a hubert model$"
    ):
        backends.load_acoustic(ckpt_with(tmp_path, "encodec", models["hubert"]))
    with pytest.raises(CheckpointError, match="names clap but .* holds a wav2vec2-bert model"):
        backends.load_conditioner_towers(ckpt_with(tmp_path, "clap", models["w2v-bert-2.0"]))


def test_pickled_weights_are_refused_and_never_unpickled(models, tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    folder = shutil.copytree(models["hubert"], tmp_path / "hubert_bin")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", no_unpickling)
    # both present: the safetensors are read, the pickle is not
    assert backends.load_semantic_features(ckpt_with(tmp_path, "hubert", folder)).feature_dim == 32
    (folder / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"weights only in pickle form \(pytorch_model.bin\).*safetensors only"
    ):
        backends.load_semantic_features(ckpt_with(tmp_path, "hubert", folder))


def test_weights_that_do_not_fit_the_architecture_are_refused(models, tmp_path):
    folder = shutil.copytree(models["hubert"], tmp_path / "hubert_partial")
    weights = load_file(str(folder / "model.safetensors"))
    dropped = sorted(k for k in weights if k.startswith("encoder.layers.0."))
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match=rf"does not fit HubertModel \({len(dropped)} missing"):
        backends.load_semantic_features(ckpt_with(tmp_path, "hubert", folder))


def test_backend_info_ids_follow_the_files_not_the_path(models, tmp_path):
    spec = BackendSpec("acoustic", "encodec", str(models["encodec"]))
    info = pretrained.backend_info(spec)
    assert info["backend"] == "encodec" and info["model_type"] == "encodec"
    assert info["version"] == __import__("transformers").__version__
    assert info["options"] == {"bandwidth": 6.0, "coarse_levels": 4}
    assert info["rates"] == {
        "acoustic_frame_rate": 75,
        "acoustic_codebooks": 8,
        "acoustic_codebook_size": 1024,
        "coarse_levels": 4,
    }
    assert str(models["encodec"]) not in json.dumps(info)
    copy = shutil.copytree(models["encodec"], tmp_path / "elsewhere")
    assert pretrained.backend_info(BackendSpec("acoustic", "encodec", str(copy)))["id"] == info["id"]
    weights = load_file(str(copy / "model.safetensors"))
    weights["decoder.layers.0.conv.bias"] += 1.0
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert pretrained.backend_info(BackendSpec("acoustic", "encodec", str(copy)))["id"] != info["id"]
    ids = {pretrained.backend_info(BackendSpec(ROLE[b], b, str(p)))["id"] for b, p in models.items()}
    assert len(ids) == 4


def test_save_random_backend_writes_a_checkpoint_layout_and_refuses_unknown_names(models, tmp_path):
    for name, folder in models.items():
        assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
        assert json.loads((folder / "config.json").read_text())["model_type"] == pretrained.MODEL_TYPES[name]
    assert (models["clap"] / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="unknown pretrained backend 'dac'"):
        pretrained.save_random_backend("dac", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        pretrained.save_random_backend("hubert", tmp_path / "x", "huge")
    tiny = {name: pretrained.count_parameters(name, "tiny") for name in ROLE}
    assert all(0 < n < 500_000 for n in tiny.values())
    assert 14e6 < pretrained.count_parameters("encodec", "full") < 16e6  # EnCodec 24 kHz: ~14.9M
