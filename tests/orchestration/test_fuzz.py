"""Fuzzing the OpenAPI schema with schemathesis: malformed and hostile input gets a 4xx JSON, never a 5xx.

The app is the in-process one (``build_local_app``: the Serve application's routes and model classes,
no Ray) on a real socket, with limits small enough that the valid requests the fuzzer finds run the
real untrained ``tiny`` models in well under a second (at most 0.2 s of audio, two samples, two story
segments). Positive cases come from the documented schema (which carries the server's limits), negative
ones break it; both must end in 200 audio or a 4xx JSON ``{"error": {"field", "message"}}``.
"""

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from musiclm.orchestration.serve import ServeConfig, build_local_app, save_random_system

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES = {"positive": 25, "negative": 40}  # per operation; the whole test stays under a minute on 2 cores


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import uvicorn

    root = save_random_system(tmp_path_factory.mktemp("fuzz_system"), "tiny", melody=False)
    config = ServeConfig(checkpoints=str(root), torch_threads=1, max_seconds=0.2, max_prompt_chars=64,
                         max_story_segments=2, max_num_samples=2, max_upload_bytes=50_000, request_timeout_s=60)
    app = build_local_app(config)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", app=app)  # the app: tests change its live limits
    server.should_exit = True
    thread.join(10)


def _verify(case, response, seen: dict) -> None:
    """200 with the documented media type, or a 4xx JSON error naming a field; never a 5xx."""
    status = response.status_code
    key = (case.operation.method.upper(), case.operation.path)
    seen.setdefault(key, {}).setdefault(status, 0)
    seen[key][status] += 1
    described = f"{case.operation.method.upper()} {case.operation.path} -> {status}: {response.content[:300]!r}\n" \
                f"body={getattr(case, 'body', None)!r:.300}"
    assert status < 500, described
    media = (response.headers.get("content-type") or [""])[0].split(";")[0]  # schemathesis: name -> [values]
    if status == 200:
        expected = {"/generate": "audio/wav", "/generate/melody": "audio/wav", "/": "text/html",
                    "/health": "application/json"}[case.operation.path]
        assert media == expected, described
        if expected == "audio/wav":
            assert response.content[:4] == b"RIFF" and len(response.content) > 44, described
    else:
        assert 400 <= status < 500 and media == "application/json", described
        error = response.json()["error"]
        assert set(error) == {"field", "message"} and isinstance(error["message"], str) and error["message"], described


def test_fuzzed_requests_never_get_a_server_error(site):
    schema = schemathesis.openapi.from_url(f"{site.url}/openapi.json")
    seen: dict = {}
    start = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if operation.method.upper() == "GET" and mode == schemathesis.GenerationMode.NEGATIVE:
                continue  # nothing to break in a GET without parameters

            @settings(max_examples=EXAMPLES[mode.value], deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:
                _verify(case, case.call(base_url=site.url, timeout=60), seen)

            fuzz()
    elapsed = time.perf_counter() - start
    generate = seen.get(("POST", "/generate"), {})
    melody = seen.get(("POST", "/generate/melody"), {})
    # the fuzzer reached the models (valid requests answered with audio) and the refusals
    assert generate.get(200, 0) >= 2, seen
    assert sum(n for status, n in generate.items() if 400 <= status < 500) >= 5, seen
    assert sum(melody.values()) >= 10 and set(melody) <= set(range(400, 500)) | {200}, seen
    print(f"fuzzing: {sum(sum(v.values()) for v in seen.values())} requests in {elapsed:.1f} s: {seen}")


def _audio(fmt: str) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(4000) / 8000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000, format=fmt)
    return buffer.getvalue()


def test_hostile_melody_files_never_get_a_server_error(site):
    """The schema fuzzer rarely gets past the ``request`` field; here the request is valid and the *file* is
    hostile: random bytes, real WAV / FLAC / OGG files truncated or with bytes flipped, headers declaring
    absurd sizes. Each must be refused with a 4xx JSON naming ``melody`` (this server has no melody
    tokenizer, so a file that decodes ends in that 422 too)."""
    import httpx
    from hypothesis import strategies as st

    seeds = [_audio("WAV"), _audio("FLAC"), _audio("OGG")]

    @st.composite
    def files(draw) -> bytes:
        kind = draw(st.sampled_from(["random", "truncated", "flipped", "header"]))
        if kind == "random":
            return draw(st.binary(max_size=2000))
        data = bytearray(draw(st.sampled_from(seeds)))
        if kind == "truncated":
            return bytes(data[: draw(st.integers(0, len(data)))])
        if kind == "flipped":
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            return bytes(data)
        data[4:8] = draw(st.binary(min_size=4, max_size=4))  # RIFF size
        data[40:44] = draw(st.binary(min_size=4, max_size=4))  # WAV data size (or FLAC/OGG bytes)
        return bytes(data)

    statuses: dict[int, int] = {}
    with httpx.Client(base_url=site.url, timeout=60) as client:

        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(data=files())
        def upload(data: bytes) -> None:
            response = client.post("/generate/melody", data={"request": '{"prompt": "hum", "seconds": 0.1}'},
                                   files={"melody": ("melody.bin", data, "application/octet-stream")})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert 400 <= response.status_code < 500, (response.status_code, response.text, data[:64])
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["field"] == "melody", response.text

        upload()
    assert {415, 422} <= set(statuses), statuses  # both refusals seen: not audio, and not usable audio


def test_timeouts_answer_504_and_release_their_slot(site, monkeypatch):
    """A generation past ``request_timeout_s`` answers a JSON 504 (streamed too, before any audio), and
    its queue slot is free again; a full queue answers 429 with Retry-After."""
    import httpx

    service = site.app.state.service
    monkeypatch.setattr(service.config, "request_timeout_s", 0.05)
    with httpx.Client(base_url=site.url, timeout=60) as client:
        for stream in (False, True):
            response = client.post("/generate", json={"prompt": "slow", "seconds": 0.2, "stream": stream})
            assert response.status_code == 504, response.text
            assert response.json()["error"]["message"].startswith("generation took longer than 0.05 s")
        deadline = time.time() + 30
        while service.active and time.time() < deadline:  # the cancelled generations wind down
            time.sleep(0.05)
        assert service.active == 0
        monkeypatch.setattr(service.config, "max_queued_requests", 0)
        response = client.post("/generate", json={"prompt": "busy", "seconds": 0.2})
        assert response.status_code == 429 and response.headers["retry-after"] == "5"
        assert response.json()["error"]["field"] is None and "busy" in response.json()["error"]["message"]
