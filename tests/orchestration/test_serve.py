"""The Serve application answering real HTTP on 127.0.0.1.

The trained checkpoints come from the pipeline elsewhere; here a session fixture saves untrained
``tiny`` models (``serve.save_random_system``, with a melody tokenizer and melody-conditioned stages).
Random weights make noise, which is all the HTTP layer needs: lengths, formats, determinism per seed,
batching that does not change a request's audio, streaming, and every refusal are checked against
it. One ``serve.run`` for the whole module (starting six deployments is the slow part).
"""

import io
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm.checkpoint import CheckpointError, save_artifact
from musiclm.constants import SAMPLE_RATE
from musiclm.orchestration.serve import (
    COMPONENTS,
    ServeConfig,
    check_checkpoints,
    components,
    run_server,
    save_random_system,
)

pytestmark = pytest.mark.slow

MAX_SECONDS = 3.0
MAX_PROMPT_CHARS = 40
MAX_QUEUED = 4
MAX_UPLOAD = 200_000
FRAME = SAMPLE_RATE // 25  # audio samples per 40-ms semantic frame


@pytest.fixture(scope="session")
def tiny_system(tmp_path_factory) -> Path:
    """A complete system checkpoint folder of untrained ``tiny`` models, melody tokenizer included."""
    return save_random_system(tmp_path_factory.mktemp("system"), "tiny", melody=True, pitch_probe=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_system):
    """ONE running application for every HTTP test here; Serve is shut down at the end."""
    from ray import serve

    config = ServeConfig(
        checkpoints=str(tiny_system),
        port=_free_port(),
        max_seconds=MAX_SECONDS,
        max_prompt_chars=MAX_PROMPT_CHARS,
        max_num_samples=3,
        max_upload_bytes=MAX_UPLOAD,
        max_queued_requests=MAX_QUEUED,
        torch_threads=1,
        access_log=False,  # Serve's per-call lines off; the JSON request log (checked below) stays
        request_timeout_s=150.0,
        batch_wait_timeout_s={name: 0.05 for name in ("conditioner", "semantic", "coarse", "fine", "codec")},
    )
    url = run_server(config, blocking=False)
    try:
        with httpx.Client(base_url=url, timeout=180.0) as client:
            yield client
    finally:
        serve.shutdown()


# ----------------------------------------------------------------------------- before any server


def test_incomplete_checkpoints_are_refused_in_one_line(tmp_path, tiny_system):
    for folder in ("semantic", "mulan"):
        shutil.copytree(tiny_system / folder, tmp_path / folder)
    (tmp_path / "coarse").mkdir()  # a folder without config.json is as missing as no folder
    with pytest.raises(CheckpointError) as info:
        run_server(ServeConfig(checkpoints=str(tmp_path)), blocking=False)  # fails before Ray is touched
    message = str(info.value)
    assert "\n" not in message
    for missing in ("mulan_rvq", "coarse", "fine", "soundstream"):
        assert f"{missing}/config.json" in message
    assert "semantic/" not in message and "mulan/" not in message
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoints(tmp_path / "nowhere")


def test_checkpoint_kinds_and_presets_are_checked(tmp_path, tiny_system):
    documents = check_checkpoints(tiny_system, preset="tiny")
    assert set(documents) == {folder for names in COMPONENTS.values() for folder in names}
    with pytest.raises(CheckpointError, match="preset 'tiny', expected 'paper'"):
        check_checkpoints(tiny_system, preset="paper")
    shutil.copytree(tiny_system, tmp_path / "swapped")
    shutil.rmtree(tmp_path / "swapped" / "fine")
    shutil.copytree(tiny_system / "coarse", tmp_path / "swapped" / "fine")
    with pytest.raises(CheckpointError, match="fine \\(holds a 'coarse' checkpoint\\)"):
        check_checkpoints(tmp_path / "swapped")


def test_stages_of_other_token_rates_and_missing_backends_are_refused(tmp_path, tiny_system):
    from musiclm.models.stages import StageConfig
    from musiclm.models.transformer import StageTransformer
    from musiclm.tokenizers.backends import BackendSpec, TokenRates, write_backends

    root = tmp_path / "system"
    shutil.copytree(tiny_system, root)
    config = StageConfig.preset("fine", "tiny", TokenRates(acoustic_frame_rate=75, acoustic_codebooks=8))
    save_artifact(root / "fine", kind="fine", preset="tiny", config=config,
                  state_dict=StageTransformer(config.transformer).state_dict())
    with pytest.raises(CheckpointError) as info:
        check_checkpoints(root)
    message = str(info.value)
    assert "\n" not in message and "tokenizers make tokens at acoustic 50 Hz x 12" in message
    assert "fine models tokens at acoustic 75 Hz x 8" in message and "coarse models" not in message

    # EnCodec and CLAP named: the codec needs no soundstream/, the conditioner only our RVQ, and their folders
    write_backends(root, {"acoustic": BackendSpec("acoustic", "encodec", str(tmp_path)),
                          "conditioner": BackendSpec("conditioner", "clap", str(tmp_path))})
    folders = components(root)
    assert folders["codec"] == () and folders["conditioner"] == ("mulan_rvq",) and folders["fine"] == ("fine",)
    assert components(tiny_system) == COMPONENTS
    (root / "backends.json").write_text('{"acoustic": {"backend": "encodec", "path": "/nowhere/encodec_24khz"}}')
    shutil.rmtree(root / "soundstream")
    with pytest.raises(CheckpointError, match="encodec model folder /nowhere/encodec_24khz named in backends.json") as info:
        check_checkpoints(root)
    assert "soundstream" not in str(info.value)


# ----------------------------------------------------------------------------- HTTP


def _wav(response: httpx.Response) -> np.ndarray:
    """The PCM of a 200 WAV answer as int16 [C, T]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    info = sf.info(io.BytesIO(response.content))
    assert info.samplerate == SAMPLE_RATE and info.subtype == "PCM_16" and info.format == "WAV"
    audio, _ = sf.read(io.BytesIO(response.content), dtype="int16", always_2d=True)  # [T, C]
    return audio.T


def _pcm(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)


def test_health_reports_every_stage(server):
    response = server.get("/health", headers={"X-Request-Id": "health-check-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "health-check-1"
    health = response.json()
    assert health["status"] == "ok"
    assert health["stages"] == {name: True for name in COMPONENTS}
    assert health["preset"] == "tiny"
    assert set(health["checkpoints"]) == {"mulan", "mulan_rvq", "melody", "melody_rvq", "semantic", "coarse",
                                          "fine", "soundstream", "pitch_probe"}
    assert health["checkpoints"]["fine"].startswith("fine:tiny:")
    assert health["token_rates"]["acoustic_frame_rate"] == 50 and health["token_rates"]["acoustic_codebooks"] == 12
    assert health["max_seconds"] == MAX_SECONDS and health["queue"]["max_queued_requests"] == MAX_QUEUED
    assert health["metrics_url"].startswith("http://") and health["metrics_url"].endswith("/metrics")
    assert set(health["batching"]) == set(COMPONENTS)


def test_generate_returns_a_wav_of_the_requested_length(server):
    response = server.post("/generate", json={"prompt": "  a calm piano melody  ", "seconds": 0.4, "seed": 3})
    pcm = _wav(response)
    assert pcm.shape == (1, 10 * FRAME)  # 10 semantic frames
    assert np.abs(pcm).max() > 0
    assert response.headers["x-seed"] == "3" and response.headers["x-samples"] == "1"
    assert float(response.headers["x-seconds"]) == pytest.approx(0.4)
    assert float(response.headers["x-generation-time"]) > 0
    assert len(response.headers["x-request-id"]) >= 16  # none given: a new one (Serve's UUID)
    # shorter than one semantic frame (40 ms): refused, naming the field
    response = server.post("/generate", json={"prompt": "a bell", "seconds": 0.01})
    assert response.status_code == 422 and response.json()["error"]["field"] == "seconds"


def test_same_seed_same_bytes_even_concurrently(server):
    body = {"prompt": "drums and bass", "seconds": 0.2, "seed": 11, "temperatures": {"semantic": 1.2}}
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: server.post("/generate", json=body), range(2))
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    other = server.post("/generate", json={**body, "seed": 12})
    assert other.status_code == 200 and other.content != first.content


def test_server_matches_the_in_process_cascade(server, tiny_system):
    """Serve executes the same plan with the same per-row seeds as ``Cascade.stream``: the same audio, also
    across windows (2.1 s: two coarse windows, four fine windows, two decoded chunks)."""
    from musiclm.generation.cascade import Cascade
    from musiclm.generation.spec import GenerationSpec

    torch.set_num_threads(1)
    cascade = Cascade.load(tiny_system)
    for body in ({"prompt": "an upbeat folk song", "seconds": 0.4, "seed": 5},
                 {"prompt": "an upbeat folk song", "seconds": 2.1, "seed": 6, "top_k": 200}):
        served = _wav(server.post("/generate", json=body))
        spec = GenerationSpec.single(body["prompt"], body["seconds"], seed=body["seed"], top_k=body.get("top_k"))
        local = _pcm(cascade.generate_spec(spec))
        assert served.shape == local.shape
        assert np.abs(served.astype(np.int32) - local).max() <= 1


def test_concurrent_requests_share_batches_and_keep_their_audio(server):
    """Rows of concurrent requests run in shared forward passes (the stages' batch counts show it), and
    each request's audio is the audio it gets alone: every row draws from its own generator."""
    bodies = [{"prompt": "calm piano", "seconds": 0.2, "seed": 21},
              {"prompt": "energetic techno", "seconds": 0.2, "seed": 22},
              {"prompt": "calm piano", "seconds": 0.2, "seed": 23, "num_samples": 2}]
    alone = [_wav(server.post("/generate", json=body)) for body in bodies]
    before = server.get("/health").json()["batching"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = [_wav(r) for r in pool.map(lambda body: server.post("/generate", json=body), bodies)]
    after = server.get("/health").json()["batching"]
    for a, b in zip(alone, together):
        assert a.shape == b.shape and np.abs(a.astype(np.int32) - b).max() <= 1
    rows = {name: after[name]["rows"] - before[name]["rows"] for name in ("semantic", "coarse", "fine")}
    batches = {name: after[name]["batches"] - before[name]["batches"] for name in ("semantic", "coarse", "fine")}
    assert all(rows[name] >= 4 for name in rows)  # 1 + 1 + 2 rows per window of each stage
    assert sum(batches.values()) < sum(rows.values()), (rows, batches)  # some rows shared a forward pass
    assert max(after[name]["largest"] for name in ("semantic", "coarse", "fine")) >= 2


def test_samples_story_stream_and_rerank(server):
    one = _wav(server.post("/generate", json={"prompt": "jazz trio", "seconds": 0.2, "seed": 4}))
    two = _wav(server.post("/generate", json={"prompt": "jazz trio", "seconds": 0.2, "seed": 4, "num_samples": 2}))
    assert two.shape == (2, one.shape[1])
    assert np.array_equal(two[0], one[0]) and not np.array_equal(two[0], two[1])  # row 0 does not depend on N

    story = {"story": [{"prompt": "calm piano", "seconds": 0.2}, {"prompt": "loud drums", "seconds": 0.12}], "seed": 2}
    told = server.post("/generate", json=story)
    assert _wav(told).shape == (1, 8 * FRAME) and float(told.headers["x-seconds"]) == pytest.approx(0.32)

    body = {"prompt": "ambient pads", "seconds": 2.1, "seed": 8}  # two coarse windows: two chunks
    whole = server.post("/generate", json=body)
    start = time.perf_counter()
    with server.stream("POST", "/generate", json={**body, "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.headers["x-stream"] == "chunked"
        ttfa = float(streamed.headers["x-time-to-first-audio"])
        chunks = [chunk for chunk in streamed.iter_raw() if chunk]
    elapsed = time.perf_counter() - start
    assert b"".join(chunks) == whole.content  # the header announces the exact length
    assert 0 < ttfa < elapsed

    reranked = server.post("/generate", json={"prompt": "jazz trio", "seconds": 0.2, "seed": 4, "num_samples": 2,
                                              "rerank": True})
    best = _wav(reranked)
    scores = [float(s) for s in reranked.headers["x-rerank-scores"].split(",")]
    order = [int(i) for i in reranked.headers["x-rerank-order"].split(",")]
    assert best.shape == (1, one.shape[1]) and sorted(order) == [0, 1] and scores == sorted(scores, reverse=True)
    assert np.array_equal(best[0], two[order[0]])


def _audio_file(fmt: str, seconds: float = 1.0, subtype: str | None = None) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format=fmt, subtype=subtype)
    return buffer.getvalue()


def test_melody_upload_conditions_and_is_checked(server):
    request = json.dumps({"prompt": "hummed tune", "seconds": 0.2, "seed": 1})
    files = {"melody": ("hum.wav", _audio_file("WAV"), "audio/wav")}
    response = server.post("/generate/melody", data={"request": request}, files=files)
    assert _wav(response).shape == (1, 5 * FRAME)
    plain = server.post("/generate", json=json.loads(request))
    assert plain.status_code == 200 and plain.content != response.content  # the melody changed the music
    other = server.post("/generate/melody", data={"request": request},
                        files={"melody": ("hum.flac", _audio_file("FLAC", 2.0), "audio/flac")})
    assert other.status_code == 200 and other.content != response.content
    # pitch guidance: the coarse deployment's probe steers the draws (the same request otherwise)
    steered = json.dumps({"prompt": "hummed tune", "seconds": 0.2, "seed": 1, "pitch_guidance": 30})
    guided = server.post("/generate/melody", data={"request": steered}, files=files)
    assert _wav(guided).shape == (1, 5 * FRAME) and guided.content != response.content

    wav = _audio_file("WAV")
    cases = [
        ({"request": request}, {"melody": ("hum.aiff", _audio_file("AIFF"), "audio/aiff")}, 415, "melody"),
        ({"request": request}, {"melody": ("hum.wav", b"not audio at all" * 10, "audio/wav")}, 415, "melody"),
        ({"request": request}, {"melody": ("hum.wav", wav[: len(wav) // 2], "audio/wav")}, 422, "melody"),
        ({"request": request}, {"melody": ("hum.wav", _audio_file("WAV", 8.0), "audio/wav")}, 413, "melody"),
        ({"request": request}, {"melody": ("hum.wav", _audio_file("WAV", 0.01), "audio/wav")}, 422, "melody"),
        ({"request": request}, {"melody": ("hum.wav", _audio_file("FLAC", 4.0), "audio/wav")}, 422, "melody"),
        ({"request": "{not json"}, {"melody": ("hum.wav", wav, "audio/wav")}, 400, "request"),
        ({"request": json.dumps({"prompt": "x", "seconds": 9})}, {"melody": ("hum.wav", wav, "audio/wav")}, 422, "seconds"),
        ({}, {"melody": ("hum.wav", wav, "audio/wav")}, 422, "request"),
        ({"request": request}, {}, 422, "melody"),
    ]
    for data, files, status, field in cases:
        response = server.post("/generate/melody", data=data, files=files or {"other": ("x", b"x")})
        assert response.status_code == status, (field, response.text)
        assert response.json()["error"]["field"] == field
    response = server.post("/generate/melody", json={"prompt": "x", "seconds": 1})
    assert response.status_code == 415 and response.json()["error"]["field"] == "content-type"
    response = server.post("/generate", json={"prompt": "x", "seconds": 0.2, "pitch_guidance": 5})
    assert response.status_code == 422 and response.json()["error"]["field"] == "pitch_guidance"  # no melody


@pytest.mark.parametrize(
    "kwargs, status, field",
    [
        ({"json": {"prompt": "", "seconds": 1}}, 422, "prompt"),
        ({"json": {"prompt": "   \n\t", "seconds": 1}}, 422, "prompt"),
        ({"json": {"prompt": "x" * (MAX_PROMPT_CHARS + 1), "seconds": 1}}, 422, "prompt"),
        ({"json": {"seconds": 1}}, 422, "prompt"),
        ({"json": {"prompt": "jazz", "seconds": 0}}, 422, "seconds"),
        ({"json": {"prompt": "jazz", "seconds": -1.5}}, 422, "seconds"),
        ({"json": {"prompt": "jazz", "seconds": MAX_SECONDS + 0.5}}, 422, "seconds"),
        ({"json": {"prompt": "jazz", "seconds": "ten"}}, 422, "seconds"),
        ({"json": {"prompt": "jazz", "seconds": 1, "seed": -4}}, 422, "seed"),
        ({"json": {"prompt": "jazz", "seconds": 1, "tempo": 120}}, 422, "tempo"),
        ({"json": {"prompt": "jazz", "seconds": 1, "temperatures": {"fine": 0}}}, 422, "temperatures.fine"),
        ({"json": {"prompt": "jazz", "seconds": 1, "temperatures": {"coarse": 7}}}, 422, "temperatures.coarse"),
        ({"json": {"prompt": "jazz", "seconds": 1, "num_samples": 4}}, 422, "num_samples"),
        ({"json": {"story": [{"prompt": "a", "seconds": 2}, {"prompt": "b", "seconds": 2}]}}, 422, "story"),
        ({"json": {"story": [{"prompt": "a", "seconds": 1}, {"prompt": "b", "seconds": 0.01}]}}, 422, "story"),
        ({"json": {"prompt": "jazz", "seconds": 1, "story": [{"prompt": "a", "seconds": 1}]}}, 422, "story"),
        ({"json": ["jazz", 1]}, 422, "body"),
        ({"content": b'{"prompt": "jazz", "seconds": ', "headers": {"content-type": "application/json"}}, 400, "body"),
        ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "body"),
        ({"content": b"[" * 100_00 + b"]" * 100_00, "headers": {"content-type": "application/json"}}, 400, "body"),
        ({"content": b'{"prompt": "' + b"x" * 70_000 + b'"}', "headers": {"content-type": "application/json"}}, 413, "body"),
        ({"content": b"prompt=jazz&seconds=1", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415, "content-type"),
        ({"content": b'{"prompt": "jazz", "seconds": 1}', "headers": {"content-type": "text/plain"}}, 415, "content-type"),
    ],
)
def test_bad_requests_get_a_json_4xx_naming_the_field(server, kwargs, status, field):
    response = server.post("/generate", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["field"] == field
    assert isinstance(error["message"], str) and error["message"]


def test_a_full_queue_answers_429_with_retry_after(server):
    body = {"prompt": "long drone", "seconds": 1.0, "seed": 1}
    with ThreadPoolExecutor(3 * MAX_QUEUED) as pool:
        responses = list(pool.map(lambda i: server.post("/generate", json={**body, "seed": i}), range(3 * MAX_QUEUED)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= MAX_QUEUED, statuses
    for refused in (r for r in responses if r.status_code == 429):  # the ingress's JSON answer, not Serve's text
        assert refused.headers["retry-after"] == "5" and refused.headers["content-type"] == "application/json"
        assert "busy" in refused.json()["error"]["message"]
    assert server.get("/health").json()["queue"]["active"] == 0  # every slot released


def test_wrong_method_unknown_route_docs_and_page(server):
    response = server.get("/generate")
    assert response.status_code == 405
    assert response.json()["error"]["field"] == "method"
    response = server.post("/generat", json={"prompt": "jazz", "seconds": 1})
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "path"
    docs = server.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    page = server.get("/")
    assert page.status_code == 200 and 'id="spectrogram"' in page.text and 'id="story"' in page.text
    spec = server.get("/openapi.json").json()
    assert {"/", "/generate", "/generate/melody", "/health"} <= set(spec["paths"])
    operation = spec["paths"]["/generate"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
    assert "audio/wav" in operation["responses"]["200"]["content"] and "429" in operation["responses"]
    assert "multipart/form-data" in spec["paths"]["/generate/melody"]["post"]["requestBody"]["content"]
    assert {"prompt", "story", "num_samples", "stream"} <= set(spec["components"]["schemas"]["GenerateRequest"]["properties"])


def _scrape(url: str, name: str, labels: dict[str, str]) -> float:
    """The sum of a Prometheus metric's samples with these labels."""
    total = 0.0
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_and_logs_carry_the_request_id(server):
    """Our counters reach Ray's Prometheus endpoint (exported every few seconds), next to Ray Serve's; the
    request's JSON log line (in the ingress replica's log) carries the id the client sent."""
    import ray

    url = server.get("/health").json()["metrics_url"]
    labels = {"route": "/generate", "status": "422"}
    before = _scrape(url, "ray_musiclm_requests_total", labels)
    request_id = f"metrics-test-{time.time_ns()}"
    response = server.post("/generate", json={"prompt": "", "seconds": 1}, headers={"X-Request-Id": request_id})
    assert response.status_code == 422 and response.headers["x-request-id"] == request_id
    deadline = time.time() + 40
    while _scrape(url, "ray_musiclm_requests_total", labels) < before + 1 and time.time() < deadline:
        time.sleep(1)
    assert _scrape(url, "ray_musiclm_requests_total", labels) >= before + 1
    assert _scrape(url, "ray_serve_num_http_requests_total", {}) > 0  # Ray Serve's own, same endpoint

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    record = None
    while record is None and time.time() < deadline + 10:
        for path in logs.glob("replica_*Ingress*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if request_id in line and "musiclm.request" in line:
                    record = json.loads(line[line.index("{", line.index("musiclm.request")):])
        time.sleep(0.5)
    assert record is not None, f"no log line with {request_id} in {logs}"
    assert record["request_id"] == request_id and record["status"] == 422 and record["path"] == "/generate"
