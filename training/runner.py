"""Driver-side jobs: train (MLflow run around a Ray launch) and publish (export, samples, register).

These are plain functions: the CLI calls them directly and the Prefect flow wraps each in a task.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep import storage
from data_prep.dataset import Dataset, read_dataset
from training.config import RunConfig
from training.errors import DataError
from training.tracking import ensure_experiment, git_commit, runs_dir, setup_mlflow

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str
    checkpoint_dir: str
    metrics: dict
    dataset_content_id: str
    config_hash: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def check_data(cfg: RunConfig, data: str) -> Dataset:
    """Refuse shards that cannot feed this config, before Ray starts. `data` is a dataset folder or
    s3:// prefix (its index.json), or a single part (its manifest.json)."""
    storage.storage_for(data).check_readable(data)
    dataset = read_dataset(data)
    if dataset.resolution is not None and dataset.resolution != cfg.model.resolution:
        raise DataError(
            f"shards in {data} are {dataset.resolution}px but model.resolution is {cfg.model.resolution}; "
            f"re-shard with --resolution {cfg.model.resolution} or set model.resolution={dataset.resolution}"
        )
    return dataset


def train(cfg: RunConfig, data_dir: str) -> TrainOutcome:
    """Train `cfg` on the dataset at `data_dir` (local or s3://) inside a new MLflow run; returns the
    final checkpoint."""
    import mlflow

    from training.launcher import launch, prepare_cluster
    from training.models import build_frozen, frozen_hashes

    if not storage.is_s3(data_dir):
        data_dir = str(Path(storage.local_path(data_dir)).resolve())
    dataset = check_data(cfg, data_dir)
    vae, text = build_frozen(cfg.model)  # a wrong model path fails here, before any run exists
    prepare_cluster(cfg)  # and a request Ray cannot place fails here, also before any run exists
    frozen = frozen_hashes(vae, text)
    uri = setup_mlflow()
    experiment_id = ensure_experiment(cfg.tracking.experiment)
    tags = {
        "git_commit": git_commit(),
        "dataset_content_id": dataset.content_id,
        "config_hash": cfg.hash,
        "preset": cfg.name,
        "data": data_dir,
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.tracking.run_name, tags=tags) as run:
        mlflow.log_params({k: _param(v) for k, v in cfg.flat().items()})
        mlflow.log_dict(cfg.to_dict(), "config.json")
        mlflow.log_params({"data.total_samples": dataset.total_samples, "data.shards": len(dataset.shards),
                           "data.parts": len(dataset.parts)})
        result = launch(cfg, data_dir, storage_dir=runs_dir() / "ray", name=f"train-{run.info.run_id}",
                        mlflow_run_id=run.info.run_id, tracking_uri=uri, frozen=frozen)
        mlflow.set_tag("checkpoint", str(result.checkpoint_dir))
    return TrainOutcome(run_id=run.info.run_id, checkpoint_dir=str(result.checkpoint_dir), metrics=result.metrics,
                        dataset_content_id=dataset.content_id, config_hash=cfg.hash)


def publish(outcome: TrainOutcome, cfg: RunConfig):
    """Export the final checkpoint as a diffusers pipeline, log sample images, register the model."""
    import mlflow

    from training.export import build_pipeline, save_pipeline
    from training.pyfunc_model import generate_images
    from training.registry import register_pipeline
    from training.sampling import image_grid

    setup_mlflow()
    pipe, _ = build_pipeline(Path(outcome.checkpoint_dir))
    out_dir = save_pipeline(pipe, runs_dir() / "exports" / outcome.run_id / "pipeline")
    images = generate_images(pipe, cfg.tracking.sample_prompts, steps=cfg.tracking.sample_steps, guidance=5.0,
                             seed=0)
    with mlflow.start_run(run_id=outcome.run_id):
        mlflow.log_image(image_grid(images), "samples/final.png")
    tags = {
        "git_commit": git_commit(),
        "dataset_content_id": outcome.dataset_content_id,
        "config_hash": outcome.config_hash,
        **{f"metric.{k}": f"{v:.6g}" for k, v in outcome.metrics.items() if isinstance(v, (int, float))},
    }
    return register_pipeline(outcome.run_id, out_dir, cfg.tracking.model_name, tags)


def _param(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]  # MLflow's param value limit
