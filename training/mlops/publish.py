"""Publishing a finished run: an `ldm` run's pipeline exported, sampled and registered; a `vae` run's
VAE exported with its latent scaling and logged to its run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.dataset import read_dataset
from training.config import RunConfig
from training.errors import ConfigError
from training.loader.batch import read_split, to_model_input
from training.locations import runs_dir, setup_mlflow
from training.mlops.checkpoint_artifacts import log_checkpoint
from training.mlops.export import (
    build_pipeline,
    export_vae,
    fetch_for_export,
    latent_scaling_factor,
    request_limits,
    save_pipeline,
    save_vae,
)
from training.mlops.registry import register_pipeline
from training.mlops.tracking import git_commit
from training.models.sampling import SamplerDefaults, generate_images, image_grid
from training.tasks.vae import reconstruction_metrics

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


def publish(outcome: TrainOutcome, cfg: RunConfig):
    """Export the final checkpoint as a diffusers pipeline, log sample images, register the model."""
    import mlflow

    if cfg.task == "vae":
        raise ConfigError("a `train-vae` run is published with publish_vae, not registered as a pipeline")

    setup_mlflow()
    with tempfile.TemporaryDirectory(prefix="ldm-export-") as tmp:
        # From shared storage only what the export reads: the gathered (or EMA) UNet, not the optimizer.
        pipe, _ = build_pipeline(fetch_for_export(outcome.checkpoint_dir, Path(tmp)))
    t = cfg.tracking
    defaults = SamplerDefaults(sampler=t.sampler, steps=t.sample_steps, guidance=t.guidance)
    out_dir = save_pipeline(pipe, runs_dir() / "exports" / outcome.run_id / "pipeline", defaults=defaults,
                            limits=request_limits(cfg))
    images = generate_images(pipe, t.sample_prompts, steps=t.sample_steps, guidance=t.guidance, sampler=t.sampler,
                             seed=0, max_batch=cfg.serving.max_batch)
    with mlflow.start_run(run_id=outcome.run_id):
        mlflow.log_image(image_grid(images), "samples/final.png")
    log_checkpoint(outcome.run_id, outcome.checkpoint_dir)  # the final checkpoint's model, fetchable from the run
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
    log_checkpoint(outcome.run_id, outcome.checkpoint_dir)
    log.info("VAE of run %s: %s (scaling factor %.4f, held-out PSNR %s)", outcome.run_id, out_dir, scaling,
             f"{metrics['export_val_psnr']:.2f} dB" if "export_val_psnr" in metrics else "not measured")
    return PublishedVAE(run_id=outcome.run_id, path=str(out_dir), uri=f"runs:/{outcome.run_id}/{VAE_ARTIFACT}",
                        scaling_factor=scaling, psnr=metrics.get("export_val_psnr"))
