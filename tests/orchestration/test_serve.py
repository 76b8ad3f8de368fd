"""The Serve application answering real HTTP on 127.0.0.1.

The trained checkpoints come from the pipeline elsewhere; here a session fixture saves randomly
initialised ``tiny`` models with the modules' own save functions. Random weights make noise, which
is all the HTTP layer needs: lengths, formats, determinism per seed and every refusal are checked
against it. One ``serve.run`` for the whole module (starting six deployments is the slow part).
"""

import io
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm.checkpoint import CheckpointError, save_artifact
from musiclm.constants import ACOUSTIC_HOP, MULAN_CODEBOOK_SIZE, MULAN_CODEBOOKS, MULAN_DIM, SAMPLE_RATE
from musiclm.orchestration.serve import COMPONENTS, ServeConfig, check_checkpoints, components, run_server

pytestmark = pytest.mark.slow

MAX_SECONDS = 2.0
MAX_PROMPT_CHARS = 40


def _random_codebooks(rvq, scale: float) -> None:
    """Untrained RVQs start with all-zero codebooks (k-means init at the first batch), which would
    make every code decode alike; random ones let different tokens make different audio. (SoundStream's
    factorized codebooks are parameters, already random.)"""
    with torch.no_grad():
        for layer in rvq.layers:
            if hasattr(layer, "embed_sum"):  # EMA codebooks (MuLan's RVQ)
                layer.codebook.normal_(0.0, scale)
                layer.embed_sum.copy_(layer.codebook)
                layer.initted.fill_(True)


@pytest.fixture(scope="session")
def tiny_system(tmp_path_factory) -> Path:
    """A complete system checkpoint folder of random-weight ``tiny`` models."""
    from musiclm.models.stages import StageConfig
    from musiclm.models.transformer import StageTransformer
    from musiclm.tokenizers.mulan import MuLan, MuLanConfig, save_mulan, save_mulan_rvq
    from musiclm.tokenizers.rvq import ResidualVQ
    from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("system")
    save_mulan(MuLan(MuLanConfig.preset("tiny")), root / "mulan", "tiny")
    mulan_rvq = ResidualVQ(MULAN_DIM, MULAN_CODEBOOKS, MULAN_CODEBOOK_SIZE)
    _random_codebooks(mulan_rvq, scale=MULAN_DIM**-0.5)
    save_mulan_rvq(mulan_rvq, root / "mulan_rvq", "tiny")
    codec_config = SoundStreamConfig.preset("tiny")
    codec = SoundStream(codec_config)
    _random_codebooks(codec.quantizer, scale=1.0)
    save_artifact(root / "soundstream", kind="soundstream", preset="tiny", config=codec_config, state_dict=codec.state_dict())
    for stage in ("semantic", "coarse", "fine"):
        config = StageConfig.preset(stage, "tiny")
        model = StageTransformer(config.transformer)
        save_artifact(root / stage, kind=stage, preset="tiny", config=config, state_dict=model.state_dict())
    return root


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
        torch_threads=1,
        request_timeout_s=120.0,
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


def _wav(response: httpx.Response) -> tuple[np.ndarray, sf._SoundFileInfo]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    info = sf.info(io.BytesIO(response.content))
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == SAMPLE_RATE
    return audio, info


def test_health_reports_every_stage(server):
    response = server.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    assert health["stages"] == {name: True for name in COMPONENTS}
    assert health["preset"] == "tiny"
    assert set(health["checkpoints"]) == {"mulan", "mulan_rvq", "semantic", "coarse", "fine", "soundstream"}
    assert health["checkpoints"]["fine"].startswith("fine:tiny:")
    assert health["token_rates"]["acoustic_frame_rate"] == 50 and health["token_rates"]["acoustic_codebooks"] == 12
    assert health["max_seconds"] == MAX_SECONDS


def test_generate_returns_a_wav_of_the_requested_length(server):
    seconds = 0.6
    response = server.post("/generate", json={"prompt": "  a calm piano melody  ", "seconds": seconds, "seed": 3})
    audio, info = _wav(response)
    assert info.channels == 1 and info.subtype == "PCM_16" and info.format == "WAV"
    assert abs(len(audio) - seconds * SAMPLE_RATE) <= ACOUSTIC_HOP
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert response.headers["x-seed"] == "3"
    assert float(response.headers["x-seconds"]) == pytest.approx(len(audio) / SAMPLE_RATE)
    assert float(response.headers["x-generation-time"]) > 0
    # shorter than one semantic frame (40 ms): generated as one frame, then cut to the request
    audio, _ = _wav(server.post("/generate", json={"prompt": "a bell", "seconds": 0.01}))
    assert len(audio) == 240


def test_same_seed_same_bytes_even_concurrently(server):
    body = {"prompt": "drums and bass", "seconds": 0.4, "seed": 11, "temperatures": {"semantic": 1.2}}
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: server.post("/generate", json=body), range(2))
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    other = server.post("/generate", json={**body, "seed": 12})
    assert other.status_code == 200 and other.content != first.content


def test_server_matches_the_in_process_cascade(server, tiny_system):
    """Serve passes the stages numpy arrays and per-stage seeds exactly as ``Cascade.generate`` does."""
    from musiclm.generation.cascade import Cascade

    torch.set_num_threads(1)
    body = {"prompt": "an upbeat folk song", "seconds": 0.4, "seed": 5}
    served, _ = _wav(server.post("/generate", json=body))
    local = Cascade.load(tiny_system).generate(body["prompt"], body["seconds"], seed=body["seed"])
    pcm = np.round(np.clip(local, -1, 1) * 32767).astype(np.int16)
    served_pcm = np.round(served * 32768).astype(np.int16)
    assert len(served_pcm) == len(pcm)
    assert np.abs(served_pcm.astype(np.int32) - pcm).max() <= 1


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
        ({"json": ["jazz", 1]}, 422, "body"),
        ({"content": b'{"prompt": "jazz", "seconds": ', "headers": {"content-type": "application/json"}}, 400, "body"),
        ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "body"),
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


def test_wrong_method_and_unknown_route_answer_json(server):
    response = server.get("/generate")
    assert response.status_code == 405
    assert response.json()["error"]["field"] == "method"
    response = server.post("/generat", json={"prompt": "jazz", "seconds": 1})
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "path"


def test_docs_and_openapi(server):
    docs = server.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    spec = server.get("/openapi.json").json()
    assert "/generate" in spec["paths"] and "/health" in spec["paths"]
    operation = spec["paths"]["/generate"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
    assert "audio/wav" in operation["responses"]["200"]["content"]
    assert {"prompt", "seconds", "seed", "temperatures"} == set(spec["components"]["schemas"]["GenerateRequest"]["properties"])
