"""Registration is idempotent in every order, against a real MLflow server: a retry after any step
that failed finishes with one version and one logged model, a FAILED run stays FAILED, two publishes
of one run racing in two processes end with one version, and model names with quotes work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from tests.mlflow_server import MlflowServer
from tests.training.tiny_pipeline import save_tiny_pipeline
from training.locations import setup_mlflow
from training.mlops import registry
from training.mlops.registry import CANDIDATE, RegistryError, filter_literal, register_pipeline
from training.mlops.tracking import ensure_experiment
from training.models.sampling import SamplerDefaults

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def server(mlflow_server) -> MlflowServer:
    """The session's server (tests/conftest.py): this module's experiment and model names are its own."""
    return mlflow_server


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "pipeline", SamplerDefaults(steps=2))


@pytest.fixture
def client(server, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    setup_mlflow()
    return MlflowClient()


def new_run(status: str = "FINISHED") -> str:
    experiment = ensure_experiment("ldmflow-registry-idempotent")
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    MlflowClient().set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def logged_models(client: MlflowClient, run_id: str) -> list:
    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return [m for m in found if m.status == LoggedModelStatus.READY]


def versions(client: MlflowClient, name: str) -> list[str]:
    return [str(mv.version) for mv in registry.model_versions(client, name)]


def has_alias(client: MlflowClient, name: str, alias: str) -> bool:
    return any(alias in mv.aliases for mv in registry.model_versions(client, name))


def test_retry_after_register_failed_registers_the_logged_model_and_a_failed_run_stays_failed(
        client, pipeline_dir, monkeypatch):
    name = "idem-register-fails"
    run_id = new_run("FAILED")
    real = registry.mlflow.register_model

    def broken(*args, **kwargs):
        raise ConnectionError("registry down between log_model and register_model")

    monkeypatch.setattr(registry.mlflow, "register_model", broken)
    with pytest.raises(ConnectionError):
        register_pipeline(run_id, pipeline_dir, name, {"config_hash": "abc"})
    assert len(logged_models(client, run_id)) == 1
    assert client.get_run(run_id).info.status == "FAILED"

    monkeypatch.setattr(registry.mlflow, "register_model", real)
    first = register_pipeline(run_id, pipeline_dir, name, {"config_hash": "abc"})
    again = register_pipeline(run_id, pipeline_dir, name, {"config_hash": "abc"})
    assert again == first
    assert versions(client, name) == [first.version]
    assert len(logged_models(client, run_id)) == 1  # the retry registered the model logged before
    assert client.get_run(run_id).info.status == "FAILED"
    mv = client.get_model_version_by_alias(name, CANDIDATE)
    assert str(mv.version) == first.version and mv.run_id == run_id
    assert mv.tags["config_hash"] == "abc" and mv.tags["run_id"] == run_id


def test_a_registration_failing_halfway_leaves_no_alias_and_the_retry_ends_with_one_version(
        client, pipeline_dir, monkeypatch):
    name = "idem-tags-fail"
    run_id = new_run()
    real = MlflowClient.set_model_version_tag

    def broken(self, *args, **kwargs):
        raise ConnectionError("registry down while tagging")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", broken)
    with pytest.raises(ConnectionError):
        register_pipeline(run_id, pipeline_dir, name, {"git_commit": "c0ffee"})
    assert len(versions(client, name)) == 1
    assert not has_alias(client, name, CANDIDATE) and not has_alias(client, name, "champion")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", real)
    found = register_pipeline(run_id, pipeline_dir, name, {"git_commit": "c0ffee"})
    assert versions(client, name) == [found.version]
    assert client.get_model_version_by_alias(name, CANDIDATE).tags["git_commit"] == "c0ffee"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_duplicate_version_from_a_concurrent_publish_is_deleted_in_favour_of_the_lower(client, pipeline_dir):
    """The race settled deterministically: another publish registered the run between this one's look
    and its register_model."""
    name = "idem-dedupe"
    run_id = new_run()
    uri = registry.log_pipeline_model(client, run_id, pipeline_dir)
    other = mlflow.register_model(uri, name)
    kept = registry._register_once(client, uri, name, run_id)
    assert kept.version == str(other.version)
    assert versions(client, name) == [kept.version]
    assert len(logged_models(client, run_id)) == 1  # both versions used one logged model: it stays


RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from training.locations import setup_mlflow
    from training.mlops.registry import register_pipeline

    run_id, folder, name, barrier, me = sys.argv[1:6]
    setup_mlflow()
    Path(barrier, me).touch()
    deadline = time.monotonic() + 120
    while len(list(Path(barrier).iterdir())) < 2:  # start together, after the slow imports
        if time.monotonic() > deadline:
            sys.exit("the other publish never started")
        time.sleep(0.01)
    print(json.dumps(register_pipeline(run_id, Path(folder), name, {"racer": me}).version))
""")


def test_two_publishes_of_one_run_racing_end_with_one_version(client, server, pipeline_dir, tmp_path):
    name = "idem-race"
    run_id = new_run()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, run_id, str(pipeline_dir), name, str(barrier), str(i)],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    assert versions(client, name) == [results[0]]
    assert str(client.get_model_version_by_alias(name, CANDIDATE).version) == results[0]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_model_names_with_quotes_are_found(client, pipeline_dir):
    name = "team's model"
    run_id = new_run()
    first = register_pipeline(run_id, pipeline_dir, name, {})
    assert register_pipeline(run_id, pipeline_dir, name, {}) == first
    assert versions(client, name) == [first.version]
    assert filter_literal('say "hi"') == """'say "hi"'"""
    with pytest.raises(RegistryError, match="both quote characters"):
        register_pipeline(run_id, pipeline_dir, """it's "quoted\"""", {})
