"""`ldmflow train --data s3://...`: Ray workers stream shards from the real S3 server (SeaweedFS)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_train_streams_shards_from_s3(tmp_path, s3_bucket, capsys):
    import ray
    from mlflow import MlflowClient

    from data_prep.dataset import read_dataset
    from pipelines.cli import main
    from training.tracking import setup_mlflow

    data = f"s3://{s3_bucket}/shards"
    assert main(["synth", "--out", str(tmp_path / "raw"), "--n", "32"]) == 0
    assert main(["shard", "--source", str(tmp_path / "raw"), "--output", data, "--samples-per-shard", "8",
                 "--no-progress"]) == 0
    try:
        code = main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", data, "--max-steps", "2",
                     "--no-register", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
                     "--set", "tracking.run_name=from-s3"])
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
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "loss")] == [1, 2]
