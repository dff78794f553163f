"""Prefect flows: orchestration only. Each task calls one library function, so the same code runs
with or without Prefect.

Tasks that touch storage retry; training does not, because a retry would start the run from
scratch, and Ray Train already restarts lost workers from the latest checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep import storage
from training.locations import runs_dir


def _prefect_home() -> None:
    # Keep Prefect's local server database beside the other run state instead of ~/.prefect.
    # Prefect creates PREFECT_HOME itself but not its parents, which a fresh clone lacks.
    home = Path(os.environ.setdefault("PREFECT_HOME", str(runs_dir() / "prefect")))
    home.mkdir(parents=True, exist_ok=True)


_prefect_home()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from training.config import RunConfig, load_config  # noqa: E402
from training.eval.gate import Decision, promote_if_better  # noqa: E402
from training.mlops.publish import PublishedVAE, TrainOutcome, publish, publish_vae  # noqa: E402
from training.mlops.registry import CANDIDATE, RegisteredVersion  # noqa: E402
from training.runtime.driver import train  # noqa: E402


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def synth_task(out_dir: str, n: int, seed: int, image_size: int) -> str:
    from data_prep.synth import generate_synthetic

    generate_synthetic(out_dir, n, seed=seed, image_size=image_size)
    return out_dir


@dataclass(frozen=True)
class ShardSummary:
    """What the shard step made: the dataset and how the run went (the flow's `shards` result)."""

    output: str
    samples: int
    """Samples in the whole dataset."""
    written: int
    """Samples this run added."""
    shards: int
    skipped: dict[str, int]
    content_id: str


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def shard_task(source: str, output: str, resolution: int, samples_per_shard: int, overwrite: bool) -> ShardSummary:
    from prefect.artifacts import create_markdown_artifact

    from data_prep.shard import ShardConfig, build_shards

    report = build_shards(ShardConfig(source=source, output=output, resolution=resolution,
                                      samples_per_shard=samples_per_shard, overwrite=overwrite, progress=False))
    get_run_logger().info("%d samples written (%d in the dataset), skipped %s", report.written,
                          report.dataset_samples, report.skipped)
    # A retried task re-runs the shard step, which then finds nothing new: the dataset is complete.
    create_markdown_artifact(report.markdown(), key="shard-report", description=f"ldmflow shard -> {output}")
    return ShardSummary(output=output, samples=report.dataset_samples, written=report.written, shards=report.shards,
                        skipped=dict(report.skipped), content_id=report.content_id)


@task(retries=0, cache_policy=NO_CACHE)
def train_task(config: RunConfig, data: str, forward_credentials: bool = False) -> TrainOutcome:
    """`config` is the resolved run config: the task never re-reads a preset file, which a worker in
    another folder or on another machine might not find. `forward_credentials`: as `ldmflow train
    --forward-credentials` (read from the task's own environment; never a flow parameter's value)."""
    return train(config, data, forward_credentials=forward_credentials)


@task(retries=0, cache_policy=NO_CACHE)
def train_vae_task(config: RunConfig, data: str, forward_credentials: bool = False) -> PublishedVAE:
    """`ldmflow train-vae` as a task: trains, exports and logs the VAE; returns its folder and scores."""
    published = publish_vae(train(config, data, forward_credentials=forward_credentials), config)
    get_run_logger().info("VAE %s: scaling factor %.4f, held-out PSNR %s dB", published.path,
                          published.scaling_factor, "-" if published.psnr is None else f"{published.psnr:.2f}")
    return published


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_task(config: RunConfig, outcome: TrainOutcome) -> RegisteredVersion:
    return publish(outcome, config)


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def gate_task(config: RunConfig, version: RegisteredVersion) -> Decision:
    """The promotion gate on the new version (config.gate): champion only if it beats the current one.
    A retry is safe: a version already champion is left as it is."""
    decision = promote_if_better(version.name, version.version, config.gate)
    get_run_logger().info("%s v%s: %s (%s)", version.name, version.version,
                          "now champion" if decision.promoted else "not promoted", decision.reason)
    return decision


@flow(name="ldm-train-pipeline", log_prints=True)
def ldm_pipeline(config_path: str = "configs/tiny.yaml", overrides: list[str] | None = None,
                 source: str | None = None, synth_n: int = 64, work_dir: str = "runs/work",
                 samples_per_shard: int = 16, overwrite_shards: bool = False, vae_config_path: str | None = None,
                 vae_overrides: list[str] | None = None, forward_credentials: bool = False,
                 promote: bool = True) -> dict:
    """(synthetic data) -> shards -> (VAE training) -> Ray/DeepSpeed LDM training -> MLflow registration.

    With `vae_config_path` (a `task: vae` config) the first stage is trained on the same shards
    first and the LDM is trained on it (model.vae.pretrained set to the exported folder). Returns
    plain data (what `ldmflow flow` prints): the shards, the VAE, the run and the model version.
    `forward_credentials` hands the training tasks' S3/MLflow credentials to every Ray node.
    `promote`: run the gate (config.gate) on the new version, which may make it `champion`."""
    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    vae_cfg = load_config(vae_config_path, list(vae_overrides or [])) if vae_config_path else None
    if vae_cfg is not None and vae_cfg.model.resolution != cfg.model.resolution:
        raise ValueError(f"{vae_config_path} trains at {vae_cfg.model.resolution}px but {config_path} at "
                         f"{cfg.model.resolution}px")
    work = Path(storage.local_path(work_dir)).resolve()  # raw data and shards of a demo run: local
    if source is None:
        source = synth_task(str(work / "raw"), synth_n, cfg.train.seed, cfg.model.resolution)
    shards = shard_task(storage.absolute(source), str(work / "shards"), cfg.model.resolution, samples_per_shard,
                        overwrite_shards)
    result: dict = {"shards": asdict(shards)}
    if vae_cfg is not None:
        vae = train_vae_task(vae_cfg, shards.output, forward_credentials)
        result["vae"] = asdict(vae)
        cfg = load_config(config_path, [*overrides, f"model.vae.pretrained={vae.path}"])
    outcome = train_task(cfg, shards.output, forward_credentials)
    version = publish_task(cfg, outcome)
    model = {"name": version.name, "version": version.version, "uri": f"models:/{version.name}@{CANDIDATE}"}
    if promote:
        decision = gate_task(cfg, version)
        model["gate"] = {"promoted": decision.promoted, "reason": decision.reason, "candidate": decision.candidate,
                         "champion_version": decision.champion_version, "champion": decision.champion}
    return {**result, "run_id": outcome.run_id, "metrics": outcome.metrics, "model": model}


def run_pipeline(**kwargs) -> dict:
    """Run the flow and return its result with the flow run's id and final state."""
    state = ldm_pipeline(return_state=True, **kwargs)
    summary = {"flow_run_id": str(state.state_details.flow_run_id), "state": state.type.value}
    if state.is_completed():
        summary.update(state.result())
    else:
        summary["message"] = state.message
    return summary


# --- batch generation ------------------------------------------------------------------------


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def batch_generate_task(job: dict) -> dict:
    # A retry is cheap: run_batch skips the images an earlier try already published.
    from training.mlops.batch_generate import BatchJob, run_batch

    return asdict(run_batch(BatchJob(**job)))


@flow(name="ldm-batch-generate", log_prints=True)
def batch_generate_flow(model: str, prompts: str, out: str, per_prompt: int = 1, seed: int = 0,
                        batch_size: int = 8, steps: int | None = None, guidance: float | None = None,
                        sampler: str | None = None) -> dict:
    """Images for every prompt of `prompts` from `model` (e.g. models:/NAME@champion) into `out`
    (a folder or s3:// prefix); index.json lists them once all exist. See training.mlops.batch_generate."""
    result = batch_generate_task({"model": model, "prompts": prompts, "out": out, "per_prompt": per_prompt,
                                  "seed": seed, "batch_size": batch_size, "steps": steps, "guidance": guidance,
                                  "sampler": sampler})
    print(f"{result['written']} images written, {result['skipped']} already there -> {result['index']}")
    return {k: v for k, v in result.items() if k != "names"}
