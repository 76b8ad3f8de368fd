"""The request model and the server config, without Ray: what is accepted, what is refused, and
which field each refusal names."""

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

LIMITS = {"max_seconds": 30.0, "max_prompt_chars": 20}


def refusal(data) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        parse_generate_request(data, **LIMITS)
    return describe_validation_error(info.value.errors())


def test_valid_request_is_normalised():
    request = parse_generate_request({"prompt": "  calm piano \n", "seconds": 4}, **LIMITS)
    assert request.prompt == "calm piano"
    assert request.seconds == 4.0 and isinstance(request.seconds, float)
    assert request.seed == 0
    assert request.resolved_temperatures() == SAMPLING_TEMPERATURES


def test_partial_temperatures_keep_paper_defaults():
    request = parse_generate_request(
        {"prompt": "x", "seconds": 1.5, "seed": 2**31 - 1, "temperatures": {"coarse": 0.5}}, **LIMITS
    )
    assert request.resolved_temperatures() == {"semantic": 1.0, "coarse": 0.5, "fine": 0.4}
    assert request.seed == 2**31 - 1


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"prompt": "", "seconds": 1}, "prompt", "empty"),
        ({"prompt": " \t\n ", "seconds": 1}, "prompt", "whitespace"),
        ({"prompt": "x" * 21, "seconds": 1}, "prompt", "at most 20"),
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
        ({"prompt": "x"}, "seconds", "required"),
        ({"prompt": "x", "seconds": 1, "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "seconds": 1, "seed": 2**31}, "seed", "less than or equal"),
        ({"prompt": "x", "seconds": 1, "seed": 1.5}, "seed", "integer"),
        ({"prompt": "x", "seconds": 1, "seed": "7"}, "seed", "integer"),
        ({"prompt": "x", "seconds": 1, "style": "jazz"}, "style", "unknown field"),
        ({"prompt": "x", "seconds": 1, "temperatures": {"fine": 0}}, "temperatures.fine", "greater than 0"),
        ({"prompt": "x", "seconds": 1, "temperatures": {"semantic": 5.5}}, "temperatures.semantic", "5"),
        ({"prompt": "x", "seconds": 1, "temperatures": {"medium": 1.0}}, "temperatures.medium", "unknown field"),
        ({"prompt": "x", "seconds": 1, "temperatures": [1, 1, 1]}, "temperatures", ""),
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
    # without a context the defaults (30 s, 500 characters) apply
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(data)
    assert GenerateRequest.model_validate({"prompt": "y" * 500, "seconds": 30}).seconds == 30.0


def test_error_field_strips_fastapi_prefix():
    assert error_field(("body", "temperatures", "fine")) == "temperatures.fine"
    assert error_field(("query", "n")) == "n"
    assert error_field(()) == "body"


def test_json_schema_documents_the_fields():
    schema = GenerateRequest.model_json_schema()
    assert set(schema["properties"]) == {"prompt", "seconds", "seed", "temperatures"}
    assert schema["required"] == ["prompt", "seconds"]
    assert schema["additionalProperties"] is False


def test_serve_config_defaults_fit_two_cores():
    config = ServeConfig(checkpoints="ckpt")
    assert set(config.num_cpus) == set(DEPLOYMENTS)
    assert all(0 < cpus < 1 for cpus in config.num_cpus.values())
    assert sum(config.num_cpus.values()) <= 2.0
    assert (config.host, config.port, config.max_seconds, config.max_prompt_chars) == ("127.0.0.1", 8000, 30.0, 500)


def test_serve_config_merges_and_checks_overrides():
    config = ServeConfig(num_cpus={"semantic": 1.0}, num_gpus={"coarse": 0.5})
    assert config.num_cpus["semantic"] == 1.0 and config.num_cpus["codec"] == 0.2
    assert config.num_gpus["coarse"] == 0.5 and config.num_gpus["fine"] == 0.0
    assert ServeConfig(**config.to_dict()) == config  # round trip through the dict the ingress receives
    with pytest.raises(ValueError, match="unknown deployment"):
        ServeConfig(num_cpus={"vocoder": 0.1})
    with pytest.raises(ValueError, match="max_seconds"):
        ServeConfig(max_seconds=0)
    with pytest.raises(ValueError, match="num_replicas"):
        ServeConfig(num_replicas={"fine": 0})
