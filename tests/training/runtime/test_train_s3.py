"""`ldmflow train --data s3://... --storage s3://...`: Ray workers stream shards from the real S3 server
(SeaweedFS), checkpoint to it with asynchronous uploads, and the model is exported and registered from
there: nothing of the run lives on local disk."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


def test_train_streams_shards_from_s3(tmp_path, s3_bucket, capsys):
    import ray
    from mlflow import MlflowClient

    from data_prep.dataset import read_dataset
    from pipelines.cli import main
    from training.locations import setup_mlflow

    data = f"s3://{s3_bucket}/shards"
    assert main(["synth", "--out", str(tmp_path / "raw"), "--n", "32"]) == 0
    assert main(["shard", "--source", str(tmp_path / "raw"), "--output", data, "--samples-per-shard", "8",
                 "--no-progress"]) == 0
    try:
        code = main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", data, "--max-steps", "4",
                     "--storage", f"s3://{s3_bucket}/ray", "--set", "train.log_every=1",
                     "--set", "train.checkpoint_every=2", "--set", "tracking.run_name=from-s3",
                     "--set", "tracking.sample_steps=2"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 0, out
    run_id = out.split("MLflow run ", 1)[1].split(";")[0]
    setup_mlflow()
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["data"] == data
    assert run.data.tags["dataset_content_id"] == read_dataset(data).content_id
    assert run.data.params["data.total_samples"] == "32"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert "registered ldm-tiny version" in out
    # Both checkpoints are in the bucket, complete; the final one holds the gathered UNet.
    from training.checkpoint.run_storage import run_uri
    from training.checkpoint.verify import latest_verified_checkpoint, list_checkpoints

    location = run_uri(f"s3://{s3_bucket}/ray", f"train-{run_id}")
    assert sorted(c.step for c in list_checkpoints(location)) == [2, 4]
    latest = latest_verified_checkpoint(location, verify_hashes=True)
    assert latest.step == 4 and "unet.safetensors" in latest.files
    assert MlflowClient().get_run(run_id).data.tags["checkpoint"] == latest.uri
