"""Driver-side jobs: train (MLflow run around a Ray launch) and publish (export, samples, register).

These are plain functions: the CLI calls them directly and the Prefect flow wraps each in a task.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep import storage
from data_prep.dataset import Dataset, read_dataset
from training.config import RunConfig
from training.errors import ConfigError, DataError
from training.tracking import ensure_experiment, git_commit, runs_dir, setup_mlflow

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str
    checkpoint_dir: str
    metrics: dict
    dataset_content_id: str
    config_hash: str
    data: str = ""
    """The dataset trained on (a `vae` run's export reads it to compute the latent scaling)."""

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


STORAGE_ENV = "LDMFLOW_STORAGE"


def default_storage() -> str:
    """Where Ray Train keeps runs and checkpoints: LDMFLOW_STORAGE (a shared path or s3://bucket/prefix,
    which every node of a cluster must reach) or, for one machine, <runs dir>/ray."""
    return os.environ.get(STORAGE_ENV) or str(runs_dir() / "ray")


def train(cfg: RunConfig, data_dir: str, *, storage_uri: str | None = None) -> TrainOutcome:
    """Train `cfg` on the dataset at `data_dir` (local or s3://) inside a new MLflow run; checkpoints
    go to `storage_uri` (default: `default_storage()`); returns the final checkpoint."""
    import mlflow

    from training.run_storage import check_run_storage

    storage_uri = _absolute(storage_uri or default_storage())
    if not storage.is_s3(data_dir):
        data_dir = str(Path(storage.local_path(data_dir)).resolve())
    dataset = check_data(cfg, data_dir)
    check_run_storage(storage_uri)  # nobody can write there: one message now, not a failed first checkpoint
    frozen = _prepare(cfg)
    uri = setup_mlflow()
    experiment_id = ensure_experiment(cfg.tracking.experiment)
    tags = {
        "git_commit": git_commit(),
        "dataset_content_id": dataset.content_id,
        "config_hash": cfg.hash,
        "preset": cfg.name,
        "task": cfg.task,
        "data": data_dir,
        STORAGE_TAG: storage_uri,
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.tracking.run_name, tags=tags) as run:
        mlflow.log_params({k: _param(v) for k, v in cfg.flat().items()})
        mlflow.log_dict(cfg.to_dict(), CONFIG_ARTIFACT)
        mlflow.log_params({"data.total_samples": dataset.total_samples, "data.shards": len(dataset.shards),
                           "data.parts": len(dataset.parts)})
        # The Ray run is named after the MLflow run, so `--resume RUN_ID` finds its checkpoints again
        # after the driver died (a head pod, a flow worker, a laptop).
        return _launch_in_run(cfg, data_dir, run.info.run_id, storage_uri, uri, frozen, dataset.content_id)


def resume(run_id: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[TrainOutcome, RunConfig]:
    """Continue the MLflow run `run_id` from its latest verified checkpoint in storage (after its
    driver died, or to train further with a higher train.max_steps): same run, steps continuing.

    `overrides` may change how the run continues (train.max_steps, train.num_workers: a different
    worker count resumes through DeepSpeed's universal checkpoint), never what is trained: a model,
    data or objective key is refused."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.config import config_from_dict
    from training.run_storage import check_run_storage, latest_verified_checkpoint, run_uri

    uri = setup_mlflow()
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--resume {run_id}: no such MLflow run in {uri}") from None
    tags = run.data.tags
    if STORAGE_TAG not in tags or "data" not in tags:
        raise ConfigError(f"--resume {run_id}: that run was not started by `ldmflow train` (no {STORAGE_TAG} tag)")
    base = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}")
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"--resume {run_id}: `{key}` cannot change on resume (allowed: "
                              f"{', '.join(sorted(RESUMABLE_KEYS))}); start a new run to change it")
    cfg = config_from_dict(base, list(overrides))
    storage_uri, data_dir = tags[STORAGE_TAG], tags["data"]
    location = run_uri(storage_uri, ray_run_name(run_id))
    latest = latest_verified_checkpoint(location)
    if latest is None:
        raise ConfigError(f"--resume {run_id}: no verified checkpoint under {location}; "
                          "the run never finished one, so start it again as a new run")
    if latest.step >= cfg.train.max_steps:
        raise ConfigError(f"--resume {run_id}: its latest checkpoint is at step {latest.step}, which already "
                          f"reaches train.max_steps={cfg.train.max_steps}; pass --max-steps to train further")
    dataset = check_data(cfg, data_dir)
    if dataset.content_id != tags.get("dataset_content_id"):
        log.warning("the dataset at %s changed since run %s started (content id %s, was %s); the resumed "
                    "epoch is re-planned over the data as it is now", data_dir, run_id, dataset.content_id,
                    tags.get("dataset_content_id"))
    check_run_storage(storage_uri)
    frozen = _prepare(cfg, check=lambda frozen: check_resumable(latest.uri, cfg, frozen))
    log.info("resuming MLflow run %s from step %d (%s)", run_id, latest.step, latest.uri)
    with mlflow.start_run(run_id=run_id):
        resumes = int(tags.get("resumes", "0")) + 1
        mlflow.set_tags({"resumes": str(resumes), f"resume.{resumes}.from_step": str(latest.step),
                         f"resume.{resumes}.overrides": " ".join(overrides) or "-"})
        # The workers find the run's latest verified checkpoint themselves (the one checked above,
        # unless a later one appeared meanwhile).
        outcome = _launch_in_run(cfg, data_dir, run_id, storage_uri, uri, frozen, tags.get("dataset_content_id", ""))
    return outcome, cfg


def check_resumable(checkpoint_uri: str, cfg: RunConfig, frozen: dict) -> None:
    """Refuse, before any worker starts, a checkpoint of another model: a different UNet, VAE or
    text encoder config, or frozen VAE/text weights that changed since (a model path whose files
    were replaced). Reads only the checkpoint's small state files."""
    from training.checkpointing import COMMITTED, FILES_DIR, STATE_FILE, model_differences, read_state
    from training.run_storage import download_checkpoint

    def small(rel: str) -> bool:
        return rel in (COMMITTED, STATE_FILE) or rel.startswith(FILES_DIR + "/")

    with tempfile.TemporaryDirectory(prefix="ldm-resume-") as tmp:
        saved = read_state(download_checkpoint(checkpoint_uri, Path(tmp), only=small), only=lambda rel: False)
    differ = model_differences(saved, cfg.to_dict()["model"])
    if differ:
        raise ConfigError(f"checkpoint {checkpoint_uri} is of a different model than the config ({', '.join(differ)} "
                          "differ); resume it with the config it was trained with")
    changed = sorted(k for k in set(saved.frozen) | set(frozen) if saved.frozen.get(k) != frozen.get(k))
    if changed:
        raise ConfigError(f"checkpoint {checkpoint_uri} was trained against other {' and '.join(changed)} weights than "
                          "the ones loaded now: the model files at the configured paths changed since")


RESUMABLE_KEYS = frozenset({"train.max_steps", "train.num_workers", "train.min_workers", "train.cpus_per_worker",
                            "train.max_failures", "train.checkpoint_every", "train.log_every",
                            "train.checkpoints_to_keep", "train.loader_workers", "train.checkpoint_upload",
                            "train.cluster_wait_s"})
"""Config keys `resume` may change: how and how long the run continues, not what it trains."""
STORAGE_TAG = "ray_storage"
CONFIG_ARTIFACT = "config.json"


def ray_run_name(run_id: str) -> str:
    return f"train-{run_id}"


def _prepare(cfg: RunConfig, check=None) -> dict:
    """Load the frozen models and join or start Ray: every error they raise comes before a run exists
    or a worker starts. `check(frozen_hashes)` runs in between (resume's model check)."""
    from training.launcher import prepare_cluster
    from training.tasks import frozen_hashes_for

    frozen = frozen_hashes_for(cfg)  # a wrong model path fails here
    if check is not None:
        check(frozen)
    prepare_cluster(cfg)  # and a request Ray cannot place fails here
    return frozen


def _launch_in_run(cfg: RunConfig, data_dir: str, run_id: str, storage_uri: str, tracking_uri: str, frozen: dict,
                   content_id: str) -> TrainOutcome:
    import mlflow

    from training.launcher import launch

    result = launch(cfg, data_dir, storage_uri=storage_uri, name=ray_run_name(run_id), mlflow_run_id=run_id,
                    tracking_uri=tracking_uri, frozen=frozen)
    mlflow.set_tag("checkpoint", result.checkpoint)
    return TrainOutcome(run_id=run_id, checkpoint_dir=result.checkpoint, metrics=result.metrics,
                        dataset_content_id=content_id, config_hash=cfg.hash, data=data_dir)


def _absolute(uri: str) -> str:
    return uri if storage.is_s3(uri) else str(Path(storage.local_path(uri)).resolve())


def publish(outcome: TrainOutcome, cfg: RunConfig):
    """Export the final checkpoint as a diffusers pipeline, log sample images, register the model."""
    import mlflow

    if cfg.task == "vae":
        raise ConfigError("a `train-vae` run is published with publish_vae, not registered as a pipeline")

    from training.export import build_pipeline, fetch_for_export, save_pipeline
    from training.pyfunc_model import generate_images
    from training.registry import register_pipeline
    from training.samplers import SamplerDefaults
    from training.sampling import image_grid

    setup_mlflow()
    with tempfile.TemporaryDirectory(prefix="ldm-export-") as tmp:
        # From shared storage only what the export reads: the gathered (or EMA) UNet, not the optimizer.
        pipe, _ = build_pipeline(fetch_for_export(outcome.checkpoint_dir, Path(tmp)))
    t = cfg.tracking
    defaults = SamplerDefaults(sampler=t.sampler, steps=t.sample_steps, guidance=t.guidance)
    out_dir = save_pipeline(pipe, runs_dir() / "exports" / outcome.run_id / "pipeline", defaults=defaults)
    images = generate_images(pipe, t.sample_prompts, steps=t.sample_steps, guidance=t.guidance, sampler=t.sampler,
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


@dataclass
class PublishedVAE:
    run_id: str
    path: str
    """The diffusers AutoencoderKL folder: what an LDM config names as model.vae.pretrained."""
    uri: str
    """The same folder as an MLflow artifact URI (runs:/RUN_ID/vae), for machines without the path."""
    scaling_factor: float
    psnr: float | None
    """Mean reconstruction PSNR (dB) on the held-out split; None without one."""


VAE_ARTIFACT = "vae"


def publish_vae(outcome: TrainOutcome, cfg: RunConfig, *, scaling_samples: int = 512) -> PublishedVAE:
    """Export a `train-vae` run's VAE as a diffusers folder, its latent scaling factor computed from the
    training split (1 / std of the latents of up to `scaling_samples` samples), scored in PSNR on the
    held-out split, logged to the run as the `vae` artifact."""
    import mlflow

    from training.export import export_vae, fetch_for_export, latent_scaling_factor, save_vae
    from training.shard_loader import read_split, to_model_input
    from training.tasks import reconstruction_metrics

    setup_mlflow()
    with tempfile.TemporaryDirectory(prefix="ldm-export-") as tmp:
        vae, _ = export_vae(fetch_for_export(outcome.checkpoint_dir, Path(tmp)))
    dataset = read_dataset(outcome.data)
    fraction, resolution = cfg.validation.holdout_fraction, cfg.model.resolution
    train_split = read_split(dataset, fraction, resolution, scaling_samples, held=False)
    scaling = latent_scaling_factor(vae, to_model_input(train_split.pixels, "cpu"), seed=cfg.train.seed)
    vae.register_to_config(scaling_factor=scaling)
    metrics = {"scaling_factor": scaling}
    if fraction > 0:
        held = read_split(dataset, fraction, resolution, cfg.validation.max_samples)
        metrics.update({f"export_{k}": v for k, v in reconstruction_metrics(vae, held, "cpu").items()})
    out_dir = save_vae(vae, runs_dir() / "exports" / outcome.run_id / VAE_ARTIFACT)
    with mlflow.start_run(run_id=outcome.run_id):
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out_dir), VAE_ARTIFACT)
        mlflow.set_tags({"vae_path": str(out_dir), "scaling_factor": f"{scaling:.6g}"})
    log.info("VAE of run %s: %s (scaling factor %.4f, held-out PSNR %s)", outcome.run_id, out_dir, scaling,
             f"{metrics['export_val_psnr']:.2f} dB" if "export_val_psnr" in metrics else "not measured")
    return PublishedVAE(run_id=outcome.run_id, path=str(out_dir), uri=f"runs:/{outcome.run_id}/{VAE_ARTIFACT}",
                        scaling_factor=scaling, psnr=metrics.get("export_val_psnr"))


def _param(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]  # MLflow's param value limit
