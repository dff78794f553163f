"""Prefect flows: orchestration only. Each task calls one library function, so the same code runs
with or without Prefect.

Tasks that touch storage retry; training does not, because a retry would start the run from
scratch, and Ray Train already restarts lost workers from the latest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_prep import storage
from training.tracking import runs_dir


def _prefect_home() -> None:
    # Keep Prefect's local server database beside the other run state instead of ~/.prefect.
    # Prefect creates PREFECT_HOME itself but not its parents, which a fresh clone lacks.
    home = Path(os.environ.setdefault("PREFECT_HOME", str(runs_dir() / "prefect")))
    home.mkdir(parents=True, exist_ok=True)


_prefect_home()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def synth_task(out_dir: str, n: int, seed: int, image_size: int) -> str:
    from data_prep.synth import generate_synthetic

    generate_synthetic(out_dir, n, seed=seed, image_size=image_size)
    return out_dir


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def shard_task(source: str, output: str, resolution: int, samples_per_shard: int, overwrite: bool) -> dict:
    from prefect.artifacts import create_markdown_artifact

    from data_prep.shard import ShardConfig, build_shards

    report = build_shards(ShardConfig(source=source, output=output, resolution=resolution,
                                      samples_per_shard=samples_per_shard, overwrite=overwrite, progress=False))
    get_run_logger().info("%d samples written (%d in the dataset), skipped %s", report.written,
                          report.dataset_samples, report.skipped)
    # A retried task re-runs the shard step, which then finds nothing new: the dataset is complete.
    create_markdown_artifact(report.markdown(), key="shard-report", description=f"ldmflow shard -> {output}")
    return {"output": output, "samples": report.dataset_samples, "written": report.written,
            "shards": report.shards, "skipped": report.skipped, "content_id": report.content_id}


@task(retries=0, cache_policy=NO_CACHE)
def train_task(config: dict, data: str) -> dict:
    """`config` is the resolved run config (plain data): the task never re-reads a preset file, which
    a worker in another folder or on another machine might not find."""
    from training.config import config_from_dict
    from training.runner import train

    outcome = train(config_from_dict(config), data)
    return outcome.__dict__


@task(retries=0, cache_policy=NO_CACHE)
def train_vae_task(config: dict, data: str) -> dict:
    """`ldmflow train-vae` as a task: trains, exports and logs the VAE; returns its folder and scores."""
    from dataclasses import asdict

    from training.config import config_from_dict
    from training.runner import publish_vae, train

    cfg = config_from_dict(config)
    published = publish_vae(train(cfg, data), cfg)
    get_run_logger().info("VAE %s: scaling factor %.4f, held-out PSNR %s dB", published.path,
                          published.scaling_factor, "-" if published.psnr is None else f"{published.psnr:.2f}")
    return asdict(published)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_task(config: dict, outcome: dict) -> dict:
    from training.config import config_from_dict
    from training.runner import TrainOutcome, publish

    version = publish(TrainOutcome(**outcome), config_from_dict(config))
    return {"name": version.name, "version": version.version, "uri": f"models:/{version.name}@candidate"}


@flow(name="ldm-train-pipeline", log_prints=True)
def ldm_pipeline(config_path: str = "configs/tiny.yaml", overrides: list[str] | None = None,
                 source: str | None = None, synth_n: int = 64, work_dir: str = "runs/work",
                 samples_per_shard: int = 16, overwrite_shards: bool = False, vae_config_path: str | None = None,
                 vae_overrides: list[str] | None = None) -> dict:
    """(synthetic data) -> shards -> (VAE training) -> Ray/DeepSpeed LDM training -> MLflow registration.

    With `vae_config_path` (a `task: vae` config) the first stage is trained on the same shards
    first and the LDM is trained on it (model.vae.pretrained set to the exported folder)."""
    from training.config import load_config

    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    vae_cfg = load_config(vae_config_path, list(vae_overrides or [])) if vae_config_path else None
    if vae_cfg is not None and vae_cfg.model.resolution != cfg.model.resolution:
        raise ValueError(f"{vae_config_path} trains at {vae_cfg.model.resolution}px but {config_path} at "
                         f"{cfg.model.resolution}px")
    work = Path(storage.local_path(work_dir)).resolve()  # raw data and shards of a demo run: local
    if source is None:
        source = synth_task(str(work / "raw"), synth_n, cfg.train.seed, cfg.model.resolution)
    shards = shard_task(_absolute(source), str(work / "shards"), cfg.model.resolution, samples_per_shard,
                        overwrite_shards)
    result: dict = {"shards": shards}
    if vae_cfg is not None:
        result["vae"] = train_vae_task(vae_cfg.to_dict(), shards["output"])
        cfg = load_config(config_path, [*overrides, f"model.vae.pretrained={result['vae']['path']}"])
    outcome = train_task(cfg.to_dict(), shards["output"])
    model = publish_task(cfg.to_dict(), outcome)
    return {**result, "run_id": outcome["run_id"], "metrics": outcome["metrics"], "model": model}


def _absolute(uri: str) -> str:
    """Local paths made absolute (tasks may run elsewhere); s3:// URIs as they are."""
    return uri if storage.is_s3(uri) else str(Path(storage.local_path(uri)).resolve())


def run_pipeline(**kwargs) -> dict:
    """Run the flow and return its result with the flow run's id and final state."""
    state = ldm_pipeline(return_state=True, **kwargs)
    summary = {"flow_run_id": str(state.state_details.flow_run_id), "state": state.type.value}
    if state.is_completed():
        summary.update(state.result())
    else:
        summary["message"] = state.message
    return summary
