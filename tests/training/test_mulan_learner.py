import io
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musiclm.checkpoint import load_artifact
from musiclm.tokenizers.mulan import load_mulan, save_random_text_model
from musiclm.training.mulan_learner import (
    MuLanLearner,
    caption_ids,
    chance_recall,
    contrastive_loss,
    gather_batch,
    retrieval_recall,
    same_caption,
)

torch.set_num_threads(1)
SR = 24000

# four kinds of sound, each with its own caption: whether MuLan ties them together is measurable
KINDS = {
    "a low hum": lambda t, rng: 0.5 * np.sin(2 * np.pi * rng.uniform(80, 120) * t),
    "a high whistle": lambda t, rng: 0.5 * np.sin(2 * np.pi * rng.uniform(2500, 3500) * t),
    "harsh white noise": lambda t, rng: 0.3 * rng.standard_normal(len(t)),
    "a fast ticking click track": lambda t, rng: (np.sin(2 * np.pi * 8 * t) > 0.95).astype(float),
}


def clips(count: int, seed: int, seconds: float = 1.5) -> list[dict]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    names = list(KINDS)
    out = []
    for i in range(count):
        name = names[i % len(names)]
        out.append({"__key__": f"c{i}", "wav": KINDS[name](t, rng).astype(np.float32), "json": {"caption": name}})
    return out


@pytest.fixture(scope="module")
def learner() -> MuLanLearner:
    return MuLanLearner("tiny", torch.device("cpu"), batch_size=8, crop_seconds=1.0, lr=3e-3)


def test_loss_and_recall_known_answers():
    e = torch.eye(4)
    same = same_caption(["a", "b", "c", "d"])
    assert torch.equal(same, torch.eye(4, dtype=torch.bool))
    assert float(contrastive_loss(e, e, torch.tensor(100.0), same)) < 1e-6
    # random pairing at scale 1 of orthogonal vectors: every choice equally likely -> log B
    assert abs(float(contrastive_loss(e, e.roll(1, 0), torch.tensor(0.0), same)) - math.log(4)) < 1e-6
    assert retrieval_recall(e, e, same, 1) == 1.0
    assert retrieval_recall(e, e.roll(1, 0), same, 1) == 0.0
    assert chance_recall(same, 1) == pytest.approx(1 / 4) and chance_recall(same, 5) == 1.0
    # a repeated caption has two right answers: the loss spreads its target over both
    dup = same_caption(["a", "a", "b"])
    assert dup.sum().item() == 5
    v = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert float(contrastive_loss(v, v, torch.tensor(100.0), dup)) < math.log(2) + 1e-4


def test_collate_skips_uncaptioned(learner, caplog):
    samples = clips(3, 0) + [{"__key__": "nocap", "wav": np.zeros(SR, np.float32), "json": {}}]
    before = learner.skipped_no_caption
    batch = learner.collate(samples)
    assert batch["wav"].shape == (3, SR) and len(batch["captions"]) == 3
    assert learner.skipped_no_caption == before + 1 and "no caption" in caplog.text
    assert learner.collate([{"__key__": "x", "wav": np.zeros(10, np.float32), "json": {"caption": ""}}]) is None


def test_text_features_are_cached(learner, monkeypatch):
    tower = learner.module.text_tower
    calls = []
    original = tower.forward
    monkeypatch.setattr(tower, "forward", lambda texts: calls.append(list(texts)) or original(texts))
    learner._text_cache.clear()
    a = learner.text_features(["a low hum", "a high whistle", "a low hum"])
    b = learner.text_features(["a high whistle", "a low hum"])
    assert calls == [["a low hum", "a high whistle"]]  # each distinct caption through the tower once
    assert torch.equal(a[1], b[0]) and torch.equal(a[0], a[2])


def test_training_beats_chance_on_held_out_clips(learner):
    train, held = clips(32, seed=1), clips(8, seed=2)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        idx = rng.choice(len(train), 8, replace=False)
        m = learner.train_step(learner.collate([train[i] for i in idx]))
        losses.append(m["loss"])
        assert math.isfinite(m["loss"]) and m["logit_scale"] > 0
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    metrics = learner.eval_step(learner.collate(held))
    # 4 captions over 8 clips: a caption is right for 2 of them, so chance recall@1 is 2/8 and
    # recall@5 misses only when the 5 places go to the 6 other clips
    assert metrics["chance_r1"] == pytest.approx(2 / 8)
    assert metrics["chance_r5"] == pytest.approx(1 - math.comb(6, 5) / math.comb(8, 5))
    assert metrics["r1"] > 0.5, metrics
    # only the audio side and the projections learned; the pretrained text tower did not move
    assert all(p.grad is None for p in learner.module.text_tower.parameters())


def test_state_round_trip_and_export(learner, tmp_path):
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)  # the runner's training_state/ is read back with weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert not any(k.startswith("text_tower.") for k in state["model"])
    learner.export(str(tmp_path / "mulan"))
    document, weights = load_artifact(tmp_path / "mulan", kind="mulan", preset="tiny")
    assert document["meta"]["step"] == learner.step
    model = load_mulan(tmp_path / "mulan")
    wav = torch.from_numpy(clips(2, 3)[1]["wav"][None])
    learner.module.eval()
    with torch.no_grad():
        assert torch.allclose(model.embed_audio(wav), learner.module.embed_audio(wav), atol=1e-6)
        assert torch.allclose(model.embed_text(["a low hum"]), learner.module.embed_text(["a low hum"]), atol=1e-6)
    learner.module.train()
    step = learner.step
    learner.load_state_dict(state)
    assert learner.step == step


# ----------------------------------------------------------------------------- a fine-tuned local text tower


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return str(save_random_text_model(tmp_path_factory.mktemp("bert") / "bert", hidden_size=32))


def test_fine_tuned_text_tower_from_a_local_folder(tiny_bert, tmp_path):
    learner = MuLanLearner("tiny", torch.device("cpu"), batch_size=4, crop_seconds=0.5,
                           text_model=tiny_bert, text_trainable=True, text_lr=1e-3)
    tower = learner.module.text_tower
    assert tower.trainable and learner.config.text_model == tiny_bert
    assert {g["lr"] for g in learner.optimizer.param_groups} == {learner.lr, 1e-3}
    before = {n: p.detach().clone() for n, p in tower.named_parameters() if p.requires_grad}
    metrics = learner.train_step(learner.collate(clips(4, 0)))
    assert math.isfinite(metrics["loss"]) and metrics["global_batch"] == 4
    moved = [n for n, p in tower.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every fine-tuned weight took a step
    with pytest.raises(RuntimeError, match="forward"):
        learner.text_features(["a low hum"])  # no cache for a tower that changes every step

    learner.export(str(tmp_path / "mulan"))
    _, weights = load_artifact(tmp_path / "mulan", kind="mulan")
    assert any(k.startswith("text_tower.") for k in weights)  # the fine-tuned tower is saved
    model = load_mulan(tmp_path / "mulan")
    learner.module.eval()
    with torch.no_grad():
        assert torch.allclose(model.embed_text(["a low hum"]), learner.module.embed_text(["a low hum"]), atol=1e-6)


# ----------------------------------------------------------------------------- the global batch across workers


def _toy_pairs() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """8 (x, y, caption) pairs; captions repeat, also across the two ranks' slices."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), ["a", "b", "a", "c", "b", "d", "a", "e"]


def _toy_loss_and_grads(x, y, captions, rank_rows=None):
    """Contrastive loss of two linear towers (+ a learned scale) and their gradients: of all rows in this
    process, or, when ``rank_rows`` is given, of this rank's rows gathered over the group, with the
    gradients averaged over the ranks as DDP does."""
    torch.manual_seed(1)
    towers = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 4), "t": torch.nn.Linear(5, 4)})
    log_scale = torch.nn.Parameter(torch.tensor(1.5))
    rows = slice(None) if rank_rows is None else rank_rows
    audio = F.normalize(towers["a"](x[rows]), dim=-1)
    text = F.normalize(towers["t"](y[rows]), dim=-1)
    ids = caption_ids(captions[rows])
    if rank_rows is not None:
        audio, text, ids = gather_batch(audio, text, ids)
    loss = contrastive_loss(audio, text, log_scale.exp(), same_caption(ids))
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in [*towers.parameters(), log_scale]]
    if rank_rows is not None:
        for g in grads:
            torch.distributed.all_reduce(g)
            g /= torch.distributed.get_world_size()
    return loss.detach(), grads, audio.shape[0]


def _two_worker_checks(rank: int, world: int, rendezvous: str, bert: str) -> None:
    """Runs in each of 2 gloo processes (fresh interpreters); any failed assert fails the test."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        x, y, captions = _toy_pairs()
        ref_loss, ref_grads, _ = _toy_loss_and_grads(x, y, captions)  # one process, the concatenated batch
        # unequal slices (3 + 5 rows), and one rank with nothing (8 + 0)
        for sizes in ([3, 5], [8, 0]):
            start = sum(sizes[:rank])
            loss, grads, n = _toy_loss_and_grads(x, y, captions, slice(start, start + sizes[rank]))
            assert n == 8
            assert torch.allclose(loss, ref_loss, atol=1e-6), (sizes, loss, ref_loss)
            for g, ref in zip(grads, ref_grads):
                assert torch.allclose(g, ref, atol=1e-6), (sizes, g, ref)
        # the loss of a rank's own rows alone differs: the check above can fail
        mine = slice(0, 3) if rank == 0 else slice(3, 8)
        local, _, n = _toy_loss_and_grads(x[mine], y[mine], captions[mine])
        assert n == mine.stop - mine.start and not torch.allclose(local, ref_loss, atol=1e-3)

        # the learner under DDP: unequal batches, then a worker without a captioned sample
        learner = MuLanLearner("tiny", torch.device("cpu"), torch.nn.parallel.DistributedDataParallel,
                               crop_seconds=0.5, text_model=bert)
        data = clips(6, seed=10 + rank)
        assert learner.train_step(learner.collate(data[: 3 + rank]))["global_batch"] == 7
        uncaptioned = [{"__key__": "u", "wav": np.zeros(SR, np.float32), "json": {}}]
        step = learner.train_step(learner.collate(data[:2] if rank == 0 else uncaptioned))
        assert step["global_batch"] == 2 and math.isfinite(step["loss"])
        checksum = torch.stack([p.detach().double().sum() for p in learner.module.parameters()])
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        assert torch.equal(gathered[0], gathered[1])  # the replicas stayed identical
    finally:
        dist.destroy_process_group()


def _gloo_worker_main(rank: int, world: int, rendezvous: str, bert: str) -> None:
    """One gloo process: the checks, then an exit that skips interpreter shutdown.

    DDP keeps the gloo process group, and its worker threads, alive past ``destroy_process_group()``,
    so nothing waits for a worker thread to retire the last collective. Retiring it frees the
    collective's tensors, whose Python objects need the GIL; when the thread asks for it just as the
    interpreter starts to finalize, Python ends the thread (pthread_exit) inside a noexcept C++
    destructor and the process aborts after every check passed ("terminate called without an active
    exception", status 134). ``os._exit`` skips finalization, as the forked children that ran these
    checks before (torch.multiprocessing) did. A failed check still raises and exits non-zero."""
    _two_worker_checks(rank, world, rendezvous, bert)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_gathered_loss_is_the_global_batch_loss(tmp_path, tiny_bert):
    """Two gloo processes: the gathered loss and the DDP-averaged gradients equal those of one
    process on the concatenated batch; the learner contrasts the global batch under DDP."""
    # Fresh interpreters, not forked children: a fork of this process inherits Ray's and gRPC's
    # threads once another test has started Ray, and such a child can deadlock or crash.
    root = Path(__file__).resolve().parents[2]
    rendezvous = tmp_path / "rendezvous"
    code = "import sys; from tests.training.test_mulan_learner import _gloo_worker_main as run; " \
           "run(int(sys.argv[1]), 2, sys.argv[2], sys.argv[3])"
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(rendezvous), tiny_bert], cwd=root,
                                stdout=log.open("w"), stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]
    deadline = time.monotonic() + 300
    try:  # a rank that fails leaves the other waiting in a collective: stop at the first failure
        while any(w.poll() is None for w in workers) and not any(w.returncode for w in workers):
            assert time.monotonic() < deadline, "the two gloo processes did not finish in 300 s"
            time.sleep(0.2)
    finally:
        for w in workers:
            w.kill()
            w.wait()
    failed = [f"rank {rank} exited with {w.returncode}:\n{log.read_text()[-3000:]}"
              for rank, (w, log) in enumerate(zip(workers, logs)) if w.returncode]
    assert not failed, "\n".join(failed)


def test_single_process_gather_is_the_identity():
    x, y, captions = _toy_pairs()
    ids = caption_ids(captions)
    a, t, i = gather_batch(x, y, ids)
    assert a is x and t is y and i is ids
    assert torch.equal(same_caption(ids), same_caption(captions))
    assert torch.equal(caption_ids(["a", "b"]), caption_ids(["a", "b"])) and int(caption_ids(["x"])) >= 0


@pytest.mark.slow
def test_two_ray_workers_contrast_the_global_batch(tmp_path, tiny_bert, ray_session):
    """A real 2-worker Ray Train run (DDP over gloo): every step contrasts both workers' pairs, with the
    local text tower fine-tuned."""
    from musiclm.data.shards import write_shard
    from musiclm.training import runner

    data = tmp_path / "audio"
    for shard in range(2):
        samples = [{**clip, "__key__": f"s{shard}{clip['__key__']}"} for clip in clips(12, seed=20 + shard)]
        write_shard(data / f"audio-{shard:06d}.tar", samples)
    out = tmp_path / "mulan"
    result = runner.train("mulan", data, out, workers=2, max_steps=4, log_every=2, checkpoint_every=4,
                          batch_size=4, eval_batches=1,
                          learner_options={"text_model": tiny_bert, "text_trainable": True, "crop_seconds": 1.0})
    rows = runner.read_metrics_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["global_batch"] == 2 * 4 for r in rows), rows  # 2 workers x 4 local pairs
    assert result["step"] == 4 and (out / "eval.json").is_file()
    _, weights = load_artifact(out, kind="mulan", preset="tiny")
    assert any(k.startswith("text_tower.") for k in weights)
