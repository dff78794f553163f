"""What the flows' tasks retry, what their caches key on, and which flow parameters are refused;
real exceptions from the libraries that raise them, no servers."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError


def transient_examples() -> list[BaseException]:
    import botocore.exceptions as boto
    import ray.exceptions as rex
    from mlflow.exceptions import MlflowException, RestException

    from training.errors import TrackingUnavailable

    lost_node = RuntimeError("Training failed")  # what Ray Train raises, caused by the lost worker
    lost_node.__cause__ = rex.ActorDiedError()
    return [
        OSError("No space left on device"),
        ConnectionResetError("reset by peer"),
        boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        boto.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        lost_node,
        rex.NodeDiedError("node 1 died"),
        MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/get failed with exception "
                        "HTTPConnectionPool: Max retries exceeded"),
        MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 503 != 200. "
                        "Response body: 'unavailable'"),
        RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "try later"}),
        TrackingUnavailable("server gone for 120 s"),
    ]


def deterministic_examples() -> list[BaseException]:
    from mlflow.exceptions import MlflowException, RestException
    from prefect.task_engine import TaskRunTimeoutError

    from data_prep.errors import DataPrepError
    from training.errors import ConfigError, DataError
    from training.models.folders import ModelPathError

    wrapped = RuntimeError("Training failed")
    wrapped.__cause__ = DataError("the shards hold 32 px images; the config trains at 64 px")
    return [
        DataError("too few samples"),
        ConfigError("config key `train.lr` must be a number"),
        DataPrepError("source folder does not exist"),
        ModelPathError("config key `model.unet.pretrained`: /nope does not exist"),  # also a FileNotFoundError
        wrapped,
        RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such run"}),
        MlflowException("a local MLflow error with the default error code"),
        ValueError("a bug"),
        TaskRunTimeoutError("Scope timed out after 60 second(s)."),  # the task's own timeout
    ]


@pytest.mark.parametrize("exc", transient_examples(), ids=lambda e: type(e).__name__)
def test_transient_failures_are_retried(exc):
    from pipelines.policies import is_transient

    assert is_transient(exc)


@pytest.mark.parametrize("exc", deterministic_examples(), ids=lambda e: type(e).__name__)
def test_deterministic_failures_are_not_retried(exc):
    from pipelines.policies import is_transient

    assert not is_transient(exc)


def test_the_training_cache_keys_on_identities_not_locations():
    from pipelines.tasks import _training_key
    from training.config import load_config

    cfg = load_config("tiny", ["train.max_steps=4"])
    key = _training_key(None, {"config": cfg, "data": "s3://bucket/data", "content_id": "a" * 64})
    # The same dataset under another prefix is the same training; new data under the same prefix is not.
    assert key == _training_key(None, {"config": cfg, "data": "/elsewhere", "content_id": "a" * 64})
    assert key != _training_key(None, {"config": cfg, "data": "s3://bucket/data", "content_id": "b" * 64})
    # What changes training changes the key (a champion init too); how the run is recorded does not.
    assert key != _training_key(None, {"config": load_config("tiny", ["train.max_steps=5"]), "content_id": "a" * 64})
    init = load_config("tiny", ["train.max_steps=4", "model.unet.pretrained=models:/m/1"])
    assert key != _training_key(None, {"config": init, "content_id": "a" * 64})
    renamed = load_config("tiny", ["train.max_steps=4", "tracking.run_name=other", "train.log_every=7"])
    assert key == _training_key(None, {"config": renamed, "content_id": "a" * 64})


def test_result_storage_defaults_under_the_runs_dir(monkeypatch, tmp_path):
    from pipelines.policies import RESULT_STORAGE_ENV, result_storage, result_storage_uri

    monkeypatch.setenv("LDMFLOW_RUNS_DIR", str(tmp_path))
    monkeypatch.delenv(RESULT_STORAGE_ENV, raising=False)
    assert result_storage() == tmp_path / "prefect-results"
    assert result_storage(str(tmp_path / "shared")) == tmp_path / "shared"
    monkeypatch.setenv(RESULT_STORAGE_ENV, "s3://results/prefect")
    assert result_storage_uri() == "s3://results/prefect"
    assert result_storage_uri(str(tmp_path / "shared")) == str(tmp_path / "shared")


@pytest.mark.parametrize(("kind", "value", "words"), [
    ("ConfigPath", "no-such-preset", "does not exist"),
    ("Override", "train.max_steps", "must look like key=value"),
    ("StorageUri", "gs://bucket/x", "unsupported storage URI"),
    ("StorageUri", "s3:/bucket/x", "slash lost"),
    ("StorageUri", "", "empty"),
    ("ModelUri", "http://host/model", "models:/NAME@ALIAS"),
    ("Seconds", 0, "greater than 0"),
])
def test_parameter_types_refuse_bad_values(kind, value, words):
    from pipelines import params

    with pytest.raises(ValidationError, match=words):
        TypeAdapter(getattr(params, kind)).validate_python(value)


def test_run_config_names_the_parameter():
    from pipelines.params import run_config
    from training.errors import ConfigError

    with pytest.raises(ConfigError, match=r"flow parameter `config` \(tiny\): config key `train.max_steps` must be an "
                                          "integer"):
        run_config("config", "tiny", ["train.max_steps=many"], task="ldm")
    with pytest.raises(ConfigError, match="flow parameter `vae_config`: shapes is a `ldm` config"):
        run_config("vae_config", "shapes", [], task="vae")
    assert run_config("config", "tiny", ["train.max_steps=3"], task="ldm").train.max_steps == 3
