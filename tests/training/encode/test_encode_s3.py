"""`ldmflow encode` on Ray workers from and to the real S3 server (SeaweedFS), then `ldmflow train` from
those latents through Ray Train + DeepSpeed: the whole latent path with nothing on local disk."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


def test_encode_and_train_from_latents_on_s3(tmp_path, s3_bucket, capsys):
    import ray
    from mlflow import MlflowClient

    from data_prep.dataset import read_dataset
    from pipelines.cli import main
    from training.loader.latents import latents_info
    from training.locations import setup_mlflow

    raw, latents = f"s3://{s3_bucket}/shards", f"s3://{s3_bucket}/latents"
    small = ["--set", "model.resolution=32"]
    assert main(["synth", "--out", str(tmp_path / "images"), "--n", "16", "--size", "32"]) == 0
    assert main(["shard", "--source", str(tmp_path / "images"), "--output", raw, "--resolution", "32",
                 "--samples-per-shard", "8", "--no-progress"]) == 0
    try:
        assert main(["encode", "--config", str(ROOT / "configs/tiny.yaml"), "--data", raw, "--out", latents,
                     "--workers", "2", *small]) == 0
        encoded = capsys.readouterr().out
        dataset = read_dataset(latents)
        assert [s.samples for s in dataset.shards] == [8, 8]
        assert latents_info(dataset).source_content_id == read_dataset(raw).content_id
        assert "2 encoded now, 0 kept" in encoded
        # A rerun finds the published latents and encodes nothing.
        assert main(["encode", "--config", str(ROOT / "configs/tiny.yaml"), "--data", raw, "--out", latents,
                     "--workers", "2", *small]) == 0
        assert "0 encoded now, 2 kept" in capsys.readouterr().out

        code = main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", latents, "--max-steps", "2",
                     "--num-workers", "1", "--storage", f"s3://{s3_bucket}/ray", "--no-register", *small,
                     "--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
                     "--set", "train.caption_dropout=0.5", "--set", "validation.holdout_fraction=0.2",
                     "--set", "tracking.sample_steps=2"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 0, out
    run_id = out.split("MLflow run ", 1)[1].split(";")[0]
    setup_mlflow()
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["data"] == latents
    assert run.data.tags["dataset_content_id"] == dataset.content_id
    losses = MlflowClient().get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2] and all(0 < m.value < 10 for m in losses)
    assert "val_loss" in run.data.metrics  # validated on the held-out latents
