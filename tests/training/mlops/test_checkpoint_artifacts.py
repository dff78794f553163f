"""The final checkpoint is reachable from its MLflow run: log_checkpoint logs its model files (the
EMA and gathered weights, the state and file lists; not DeepSpeed's optimizer shards) under
checkpoints/step-N, tags the run with where, and what a consumer downloads through the tracking
server exports to the same UNet as the checkpoint in storage (local or S3). A real DeepSpeed engine
over the tiny UNet writes the checkpoint (as test_export_gathered does), a real MLflow server holds
the run."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch

from data_prep import storage
from tests.training.mlops.export_run import copying_report, train_and_save
from training.checkpoint.layout import EMA_FILE, STATE_FILE, UNET_FILE, CheckpointError
from training.locations import setup_mlflow
from training.mlops import checkpoint_artifacts
from training.mlops.checkpoint_artifacts import ARTIFACTS_TAG, STEP_TAG, log_checkpoint
from training.mlops.export import build_pipeline


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    """The session's server (tests/conftest.py), this process pointed at it for the module."""
    server = mlflow_server
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    try:
        setup_mlflow()
        mlflow.set_experiment("ldmflow-checkpoint-artifacts-test")
        yield server
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        setup_mlflow()


@pytest.fixture
def stored(monkeypatch, tmp_path):
    import ray.train

    folders: list = []
    monkeypatch.setattr(ray.train, "report", copying_report(tmp_path, folders))
    return folders


def new_run() -> str:
    with mlflow.start_run() as run:
        pass
    return run.info.run_id


def upload(folder: Path, uri: str) -> str:
    store = storage.storage_for(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(str(path), storage.join(uri, path.relative_to(folder).as_posix()))
    return uri


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_final_checkpoints_model_is_fetchable_from_the_run(tmp_path, process_group, stored, tracking, request,
                                                               where):
    _, _, ckpt = train_and_save(stored, 2, "fp32", True)
    uri = str(ckpt)
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        uri = upload(ckpt, f"s3://{bucket}/runs/train-x/{ckpt.name}")

    run_id = new_run()
    logged = log_checkpoint(run_id, uri)
    assert logged is not None and logged.step == 2 and logged.uri == f"runs:/{run_id}/checkpoints/step-2"
    assert {EMA_FILE, UNET_FILE, STATE_FILE, "COMMITTED", "files/rank-0.json"} <= set(logged.files)
    assert not [f for f in logged.files if f.startswith("deepspeed/")]  # no optimizer shards
    tags = mlflow.get_run(run_id).data.tags
    assert tags[ARTIFACTS_TAG] == logged.uri and tags[STEP_TAG] == "2"

    # A consumer that knows only the tracking server fetches it and exports the same model.
    fetched = Path(mlflow.artifacts.download_artifacts(tags[ARTIFACTS_TAG], dst_path=str(tmp_path / "fetched")))
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == list(logged.files)
    for use_ema in (True, False):
        from_run, _ = build_pipeline(fetched, use_ema=use_ema)
        from_storage, _ = build_pipeline(ckpt, use_ema=use_ema)
        a, b = from_run.unet.state_dict(), from_storage.unet.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Logging it again (a retried publish) rewrites the same files.
    assert log_checkpoint(run_id, uri) == logged


def test_a_checkpoint_without_model_weights_is_not_logged_and_a_corrupt_one_is_refused(tmp_path, process_group,
                                                                                      stored, tracking, caplog):
    _, _, intermediate = train_and_save(stored, 2, "fp32", False, save_steps=(1,))
    run_id = new_run()
    with caplog.at_level("WARNING", logger=checkpoint_artifacts.__name__):
        assert log_checkpoint(run_id, str(intermediate)) is None
    assert "no gathered or EMA weights" in caplog.text
    assert mlflow.artifacts.list_artifacts(run_id=run_id) == []
    assert ARTIFACTS_TAG not in mlflow.get_run(run_id).data.tags

    _, _, final = train_and_save(stored, 0, "fp32", False)
    weights = final / UNET_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        log_checkpoint(run_id, str(final))
    assert mlflow.artifacts.list_artifacts(run_id=run_id) == []
