"""The request model and the server config, without Ray: what is accepted, what is refused, and
which field each refusal names."""

import dataclasses
from pathlib import Path

import pytest

from musiclm.constants import SAMPLING_TEMPERATURES
from musiclm.orchestration.schemas import (
    DEPLOYMENTS,
    GenerateRequest,
    ServeConfig,
    ValidationError,
    describe_validation_error,
    error_field,
    parse_generate_request,
)
from musiclm.orchestration.serve_config import BATCHES_IN_FLIGHT

LIMITS = {"max_seconds": 30.0, "max_prompt_chars": 20, "max_story_segments": 3, "max_num_samples": 4}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "serve.yaml"


def refusal(data) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        parse_generate_request(data, **LIMITS)
    return describe_validation_error(info.value.errors())


def test_valid_request_is_normalised():
    request = parse_generate_request({"prompt": "  calm piano \n", "seconds": 4}, **LIMITS)
    assert request.prompt == "calm piano"
    assert request.seconds == 4.0 and isinstance(request.seconds, float)
    assert (request.seed, request.num_samples, request.rerank, request.stream) == (0, 1, False, False)
    assert request.resolved_temperatures() == SAMPLING_TEMPERATURES
    assert request.segments == [("calm piano", 4.0)] and request.total_seconds == 4.0


def test_story_and_sampling_options():
    request = parse_generate_request(
        {"story": [{"prompt": " calm piano", "seconds": 15}, {"prompt": "energetic techno", "seconds": 10.5}],
         "seed": 2**31 - 1, "num_samples": 3, "top_k": 50, "top_p": 0.9, "guidance_scale": 3.0, "rerank": True,
         "temperatures": {"coarse": 0.5}},
        **LIMITS,
    )
    assert request.segments == [("calm piano", 15.0), ("energetic techno", 10.5)]
    assert request.total_seconds == 25.5 and request.prompt is None
    assert request.resolved_temperatures() == {"semantic": 1.0, "coarse": 0.5, "fine": 0.4}
    assert (request.top_k, request.top_p, request.guidance_scale) == (50, 0.9, 3.0)
    assert parse_generate_request({"prompt": "x", "seconds": 1, "stream": True}, **LIMITS).stream


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"prompt": "", "seconds": 1}, "prompt", "empty"),
        ({"prompt": " \t\n ", "seconds": 1}, "prompt", "whitespace"),
        ({"prompt": "x" * 21, "seconds": 1}, "prompt", "at most 20"),
        ({"prompt": "a\x00b", "seconds": 1}, "prompt", "NUL"),
        ({"prompt": 5, "seconds": 1}, "prompt", "string"),
        ({"seconds": 1}, "prompt", "required"),
        ({"prompt": "x", "seconds": 0}, "seconds", "greater than 0"),
        ({"prompt": "x", "seconds": -3}, "seconds", "greater than 0"),
        ({"prompt": "x", "seconds": 30.5}, "seconds", "at most 30"),
        ({"prompt": "x", "seconds": "ten"}, "seconds", "number"),
        ({"prompt": "x", "seconds": "10"}, "seconds", "number"),
        ({"prompt": "x", "seconds": True}, "seconds", "number"),
        ({"prompt": "x", "seconds": float("nan")}, "seconds", ""),
        ({"prompt": "x", "seconds": float("inf")}, "seconds", ""),
        ({"prompt": "x"}, "seconds", "required with a prompt"),
        ({"prompt": "x", "seconds": 1, "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "seconds": 1, "seed": 2**31}, "seed", "less than or equal"),
        ({"prompt": "x", "seconds": 1, "seed": 1.5}, "seed", "integer"),
        ({"prompt": "x", "seconds": 1, "seed": "7"}, "seed", "integer"),
        ({"prompt": "x", "seconds": 1, "style": "jazz"}, "style", "unknown field"),
        ({"prompt": "x", "seconds": 1, "temperatures": {"fine": 0}}, "temperatures.fine", "greater than 0"),
        ({"prompt": "x", "seconds": 1, "temperatures": {"semantic": 5.5}}, "temperatures.semantic", "5"),
        ({"prompt": "x", "seconds": 1, "temperatures": {"medium": 1.0}}, "temperatures.medium", "unknown field"),
        ({"prompt": "x", "seconds": 1, "temperatures": [1, 1, 1]}, "temperatures", ""),
        ({"prompt": "x", "seconds": 1, "num_samples": 0}, "num_samples", "greater than or equal to 1"),
        ({"prompt": "x", "seconds": 1, "num_samples": 5}, "num_samples", "at most 4"),
        ({"prompt": "x", "seconds": 1, "top_k": 0}, "top_k", "greater than or equal to 1"),
        ({"prompt": "x", "seconds": 1, "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "x", "seconds": 1, "top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"prompt": "x", "seconds": 1, "guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
        ({"prompt": "x", "seconds": 1, "rerank": "yes"}, "rerank", "boolean"),
        ({"prompt": "x", "seconds": 1, "rerank": True}, "rerank", "num_samples >= 2"),
        ({"prompt": "x", "seconds": 1, "num_samples": 2, "rerank": True, "stream": True}, "stream", "cannot stream"),
        ({"prompt": "x", "seconds": 1, "story": [{"prompt": "y", "seconds": 1}]}, "story", "not both"),
        ({"story": [{"prompt": "y", "seconds": 1}], "seconds": 2}, "seconds", "leave 'seconds' out"),
        ({"story": []}, "story", "at least 1"),
        ({"story": [{"prompt": "y", "seconds": 1}] * 4}, "story", "at most 3"),
        ({"story": [{"prompt": "y", "seconds": 20}] * 2}, "story", "at most 30 s"),
        ({"story": [{"prompt": "", "seconds": 1}]}, "story.0.prompt", "empty"),
        ({"story": [{"prompt": "y", "seconds": 0}]}, "story.0.seconds", "greater than 0"),
        ({"story": [{"prompt": "y"}]}, "story.0.seconds", "required"),
        ({"story": [{"prompt": "y", "seconds": 1, "mood": "sad"}]}, "story.0.mood", "unknown field"),
        ({"story": "calm piano:15"}, "story", "list"),
        (["x", 1], "body", "JSON object"),
        ("x", "body", "JSON object"),
    ],
)
def test_bad_requests_name_the_field(data, field, words):
    described = refusal(data)
    assert described["field"] == field
    assert words.lower() in described["message"].lower()


def test_limits_come_from_the_context():
    data = {"prompt": "y" * 100, "seconds": 45.0}
    assert parse_generate_request(data, max_seconds=60.0, max_prompt_chars=100).seconds == 45.0
    with pytest.raises(ValidationError):
        parse_generate_request(data, max_seconds=40.0, max_prompt_chars=100)
    # without a context the defaults (300 s, 500 characters, 4 samples) apply
    assert GenerateRequest.model_validate({"prompt": "y" * 500, "seconds": 300}).seconds == 300.0
    for bad in ({"prompt": "y" * 501, "seconds": 3}, {"prompt": "y", "seconds": 301}, {"prompt": "y", "seconds": 1, "num_samples": 5}):
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate(bad)


def test_error_field_strips_fastapi_prefix():
    assert error_field(("body", "temperatures", "fine")) == "temperatures.fine"
    assert error_field(("query", "n")) == "n"
    assert error_field(()) == "body"


def test_json_schema_documents_the_fields():
    schema = GenerateRequest.model_json_schema()
    assert set(schema["properties"]) == {
        "prompt", "story", "seconds", "seed", "num_samples", "top_k", "top_p", "guidance_scale", "temperatures",
        "rerank", "stream", "pitch_guidance",
    }
    assert "required" not in schema  # prompt-or-story is checked by the model, and named in the error
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["StorySegment"]["required"] == ["prompt", "seconds"]


# ----------------------------------------------------------------------------- ServeConfig


def test_serve_config_defaults_fit_two_cores_and_batch():
    config = ServeConfig(checkpoints="ckpt")
    assert set(config.num_cpus) == set(DEPLOYMENTS)
    assert all(0 < cpus < 1 for cpus in config.num_cpus.values())
    assert sum(config.num_cpus.values()) <= 2.0
    assert (config.host, config.port, config.max_seconds, config.max_prompt_chars) == ("127.0.0.1", 8000, 300.0, 500)
    for name in DEPLOYMENTS[1:]:  # Serve's rule: max_ongoing_requests >= max_batch_size where batching
        options = config.deployment_options(name)
        assert options["max_ongoing_requests"] >= config.max_batch_size[name] > 1
        assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert config.deployment_options("ingress")["max_ongoing_requests"] > config.max_queued_requests
    # Serve's plain-text bound sits far behind the ingress's JSON one (its router lags under load)
    assert config.router_queue() >= 4 * config.max_queued_requests + config.ongoing("ingress") - config.max_queued_requests


def test_serve_config_merges_and_checks_overrides():
    config = ServeConfig(num_cpus={"semantic": 1.0}, num_gpus={"coarse": 0.5}, max_batch_size={"fine": 16})
    assert config.num_cpus["semantic"] == 1.0 and config.num_cpus["codec"] == 0.2
    assert config.num_gpus["coarse"] == 0.5 and config.num_gpus["fine"] == 0.0
    assert config.deployment_options("fine")["max_ongoing_requests"] == 16 * BATCHES_IN_FLIGHT
    assert config.deployment_options("coarse")["ray_actor_options"] == {"num_cpus": 0.3, "num_gpus": 0.5}
    assert config.deployment_options("coarse")["logging_config"] == {"enable_access_log": True}
    quiet = ServeConfig(access_log=False)
    assert all(quiet.deployment_options(name)["logging_config"] == {"enable_access_log": False} for name in DEPLOYMENTS)
    assert ServeConfig(**config.to_dict()) == config  # round trip through the dict the replicas receive
    with pytest.raises(ValueError, match="unknown deployment"):
        ServeConfig(num_cpus={"vocoder": 0.1})
    with pytest.raises(ValueError, match="max_seconds"):
        ServeConfig(max_seconds=0)
    with pytest.raises(ValueError, match="num_replicas"):
        ServeConfig(num_replicas={"fine": 0})
    with pytest.raises(ValueError, match=r"max_ongoing_requests\['coarse'\] = 4 is below its max_batch_size \(8\)"):
        ServeConfig(max_ongoing_requests={"coarse": 4})
    with pytest.raises(ValueError, match="unknown key"):
        ServeConfig(autoscaling_config={"fine": {"max_replica": 3}})


def test_example_yaml_is_read_and_documents_every_key():
    config = ServeConfig.from_yaml(EXAMPLE)
    assert Path(config.checkpoints) == (EXAMPLE.parent / "../checkpoints").resolve()
    assert config.max_seconds == 300 and config.upload_formats == ("wav", "flac", "ogg", "mp3")
    semantic = config.deployment_options("semantic")
    assert semantic["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}
    assert "num_replicas" not in semantic
    assert config.max_batch_size["coarse"] == 8 and config.batch_wait_timeout_s["codec"] == 0.01
    text = EXAMPLE.read_text()
    documented = {f.name for f in dataclasses.fields(ServeConfig)}
    for key in documented:
        assert key in text, f"examples/serve.yaml does not document '{key}'"


@pytest.mark.parametrize(
    "yaml_text, words",
    [
        ("prot: 9000\n", "unknown key 'prot'"),
        ("limits: {max_second: 10}\n", "unknown key 'limits.max_second'"),
        ("deployments: {vocoder: {num_cpus: 1}}\n", "unknown deployment 'deployments.vocoder'"),
        ("deployments: {fine: {num_gpu: 1}}\n", "unknown key 'deployments.fine.num_gpu'"),
        ("deployments: {fine: {autoscaling_config: {max_replica: 2}}}\n",
         "unknown key 'deployments.fine.autoscaling_config.max_replica'"),
        ("deployments: {fine: {num_replicas: 2, autoscaling_config: {max_replicas: 2}}}\n", "both num_replicas"),
        ("deployments: {ingress: {max_batch_size: 4}}\n", "the ingress does not batch"),
        ("limits: {max_seconds: -1}\n", "max_seconds must be a number > 0"),
        ("deployments: {coarse: {max_batch_size: 16, max_ongoing_requests: 8}}\n", "below its max_batch_size"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("port: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_refused_naming_the_key(tmp_path, yaml_text, words):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as info:
        ServeConfig.from_yaml(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_yaml_sets_address_and_relative_checkpoints(tmp_path):
    path = tmp_path / "conf" / "serve.yaml"
    path.parent.mkdir()
    path.write_text("address: ray://head:10001\ncheckpoints: ckpt\nport: 9000\nlimits: {max_num_samples: 2}\n")
    config = ServeConfig.from_yaml(path)
    assert config.address == "ray://head:10001" and config.port == 9000 and config.max_num_samples == 2
    assert config.checkpoints == str((tmp_path / "conf" / "ckpt").resolve())
    assert config.limits()["max_num_samples"] == 2
    with pytest.raises(ValueError, match="does not exist"):
        ServeConfig.from_yaml(tmp_path / "missing.yaml")
