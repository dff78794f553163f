"""`ldmflow registry list|promote|rollback` against a real MLflow server with tiny registered models:
promotion through the gate (real evaluation), a forced move and a rollback recorded on the versions,
and unknown names or aliases as one clear error line (exit 2)."""

from __future__ import annotations

from collections.abc import Iterator

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines.cli import main
from tests.mlflow_server import MlflowServer
from tests.training.tiny_pipeline import save_tiny_pipeline
from training.locations import setup_mlflow
from training.mlops.registry import CANDIDATE, CHAMPION, register_pipeline
from training.mlops.tracking import ensure_experiment
from training.models.sampling import SamplerDefaults

NAME = "cli-registry"
GATE = ["--set", "gate.prompts=2", "--set", "gate.per_prompt=1", "--set", "gate.steps=2", "--set", "gate.floor=0",
        "--set", "gate.first_floor=0", "--set", "gate.margin=0"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("LDMFLOW_USER", "carol")
    setup_mlflow()
    return MlflowClient()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(NAME, CHAMPION).version)


def test_promote_force_list_and_rollback(client, capsys, tmp_path):
    folder = save_tiny_pipeline(tmp_path / "pipeline", SamplerDefaults(steps=2))
    experiment = ensure_experiment("ldmflow-registry-cli")
    for _ in range(2):  # one pipeline, two runs: two versions that score the same
        with mlflow.start_run(experiment_id=experiment) as r:
            pass
        register_pipeline(r.info.run_id, folder, NAME, {"git_commit": "abc123"})

    code, out, err = run(capsys, "promote", "1", "--model", NAME, *GATE)
    assert code == 0 and "v1: promoted to champion: first version" in out, err
    assert champion(client) == "1"

    code, out, _ = run(capsys, "promote", CANDIDATE, "--model", NAME, *GATE, "--require-promotion")
    assert code == 1 and "v2: not promoted" in out and "champion v1 re-scored" in out
    code, out, _ = run(capsys, "promote", CANDIDATE, "--model", NAME, *GATE)
    assert code == 0 and "not promoted" in out  # a refusal is not an error unless asked
    assert champion(client) == "1"

    code, out, _ = run(capsys, "promote", "2", "--model", NAME, "--force", "--why", "hotfix for team B")
    assert code == 0 and "champion 1 -> 2 (forced by carol)" in out
    tags = client.get_model_version(NAME, "2").tags
    assert (tags["champion.by"], tags["champion.from"], tags["champion.action"], tags["champion.why"]) == \
        ("carol", "1", "force", "hotfix for team B")
    assert tags["champion.at"].startswith("20") and tags["gate.decision"] == "refused"

    code, out, _ = run(capsys, "list", "--model", NAME)
    assert code == 0 and "champion history 1 -> 2" in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "candidate,champion" in rows["2"] and "git_commit=abc123" in rows["2"]
    assert "shape_adherence=" in rows["1"] and "champion.action=gate" in rows["1"]

    code, out, _ = run(capsys, "rollback", "--model", NAME, "--why", "v2 broke a consumer")
    assert code == 0 and "champion 2 -> 1 (rollback by carol)" in out
    assert champion(client) == "1"
    assert client.get_model_version(NAME, "1").tags["champion.why"] == "v2 broke a consumer"

    code, _, err = run(capsys, "rollback", "--model", NAME)
    assert code == 2 and "no earlier champion to restore" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["list", "--model", "no-such-model"], "no registered model 'no-such-model'"),
    (["promote", "3", "--model", "no-such-model"], "no registered model 'no-such-model'"),
    (["rollback", "--model", "no-such-model"], "no registered model 'no-such-model'"),
    (["promote", "staging", "--model", NAME], "has no version or alias 'staging'"),
    (["promote", "99", "--model", NAME, "--force"], "has no version or alias '99'"),
    (["promote", "1", "--model", NAME, "--set", "gate.margin=5"], "`gate.margin` must be in [0, 1)"),
])
def test_unknown_names_and_aliases_are_one_clear_error(client, capsys, argv, message):
    if NAME not in {m.name for m in client.search_registered_models()}:
        client.create_registered_model(NAME)
    code, _, err = run(capsys, *argv)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
