"""The batch-generation flow on Prefect's temporary local server, against a real MLflow server with a
tiny registered model: a folder half written by an interrupted run is completed, and the result equals
what the CLI writes in one go."""

from __future__ import annotations

import json

from pipelines.cli import main
from tests.training.mlops.consumer_fixtures import NAME  # fixtures: tests/conftest.py, tests/pipelines/conftest.py


def test_flow_completes_an_interrupted_batch(registered, prefect_server, tmp_path, monkeypatch):
    from pipelines.flows import batch_generate_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square on a white background\n")
    model = f"models:/{NAME}@champion"
    args = ["--model", model, "--prompts", str(prompts), "--per-prompt", "2", "--steps", "2"]
    assert main(["generate-batch", *args, "--out", str(tmp_path / "cli")]) == 0
    assert main(["generate-batch", *args, "--out", str(tmp_path / "flow"), "--limit", "1"]) == 0

    summary = batch_generate_flow(model=model, prompts=str(prompts), out=str(tmp_path / "flow"), per_prompt=2,
                                  steps=2)
    assert summary["complete"] and summary["written"] == 3 and summary["skipped"] == 1
    files = {p.name: p.read_bytes() for p in (tmp_path / "flow").iterdir()}
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "cli").iterdir()}
    assert len(json.loads(files["index.json"])["images"]) == 4
