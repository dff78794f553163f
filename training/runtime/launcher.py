"""Launching the workers: a Ray ``TorchTrainer`` running training.runtime.loop on N ranks.

With ``RAY_ADDRESS`` set it joins that cluster; otherwise it starts Ray on this machine. Only
resources change between the two: the loop, config and checkpoints are the same. Workers ask for
GPUs exactly when ``train.use_gpu`` says so.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass

from data_prep import storage
from training.checkpoint.run_storage import checkpoint_uri, ray_storage
from training.checkpoint.verify import latest_verified_checkpoint
from training.config import RunConfig
from training.errors import ConfigError
from training.locations import split_credentials
from training.runtime import stopping
from training.runtime.cluster import check_job_forwards
from training.runtime.context import WorkerPayload
from training.runtime.loop import worker_entry
from training.runtime.preflight import PreflightError, StopOnPreflightFailure

log = logging.getLogger(__name__)


SAMPLE_LOG_ENV = "LDMFLOW_SAMPLE_LOG"
"""A folder where every rank logs the keys of each batch it trains on (see training.runtime.metrics.SampleLog)."""


@dataclass
class LaunchResult:
    checkpoint: str
    """The final committed checkpoint: a local path, or an s3:// URI for S3 storage."""
    metrics: dict


def ensure_ray(cfg: RunConfig, forward_env: dict[str, str] | None = None) -> None:
    """Join RAY_ADDRESS's cluster or start a local Ray. `forward_env` (`--forward-credentials`:
    training.runtime.cluster) goes into the job's runtime environment, which every process of the job
    on every node inherits, Ray Train's controller and workers included."""
    import ray

    if ray.is_initialized():
        if forward_env:
            check_job_forwards(ray.get_runtime_context().runtime_env.get("env_vars") or {}, forward_env)
        return
    runtime_env: dict = {"worker_process_setup_hook": "training.quiet.quiet_ray_internals"}
    if forward_env:
        runtime_env["env_vars"] = dict(forward_env)
        log.info("forwarding %s to every node of the Ray job", ", ".join(sorted(forward_env)))
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    # A local Ray gets enough logical CPUs for the requested workers even on a 2-core machine:
    # the workers share the cores, which is what a CPU smoke run wants. (So check_resources' CPU
    # check never fires for a Ray started here; GPUs are whatever Ray detects on this machine.)
    wanted = cfg.train.num_workers * cfg.train.cpus_per_worker + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=False, runtime_env=runtime_env)


def check_resources(cfg: RunConfig) -> None:
    """Refuse, with one message, a request Ray cannot place instead of letting it wait forever.

    A fixed-size local Ray is checked at once. A cluster named by RAY_ADDRESS may autoscale (the
    shipped specs start with zero GPU nodes): it is asked for the workers' resources and given
    train.cluster_wait_s to provide them, then the run is refused (a cluster without GPUs and
    without an autoscaler, or an autoscaler that cannot add the node type)."""
    if os.environ.get("RAY_ADDRESS"):
        wait_for_cluster(cfg, timeout_s=cfg.train.cluster_wait_s)
        return
    import ray

    have = ray.cluster_resources()
    check_local_resources(cfg, gpus=have.get("GPU", 0), cpus=have.get("CPU", 0))


def check_local_resources(cfg: RunConfig, *, gpus: float, cpus: float) -> None:
    """The check of `check_resources` for a local Ray with `gpus` GPUs and `cpus` logical CPUs.

    Each worker asks for train.cpus_per_worker CPUs and, with train.use_gpu, one GPU; Ray Train's
    controller asks for none. A Ray started by `ensure_ray` always has CPUs enough (it is started
    with num_workers * cpus_per_worker logical CPUs or more), so the CPU check only bites when the
    process had already started a smaller local Ray itself (`ray.init(num_cpus=...)`).
    """
    train = cfg.train
    workers = train.min_workers or train.num_workers  # an elastic run starts with what it can place
    problems = []
    if train.use_gpu and gpus < workers:
        cpu_run = "set train.use_gpu=false for a CPU run"
        if train.precision != "fp32":
            cpu_run += (f" (with train.precision=fp32, or train.allow_cpu_half_precision=true to keep "
                        f"{train.precision})")
        fewer = f", lower train.num_workers to {int(gpus)} to use the GPUs here" if gpus >= 1 else ""
        problems.append(
            f"train.use_gpu=true asks for {workers} GPU workers (train.num_workers={train.num_workers}) "
            f"but the local Ray has {int(gpus)} GPUs: {cpu_run}{fewer}, "
            "or set RAY_ADDRESS to a Ray cluster with (or autoscaling to) GPU nodes"
        )
    wanted_cpus = workers * train.cpus_per_worker
    if cpus < wanted_cpus:
        problems.append(
            f"train.num_workers={train.num_workers} x train.cpus_per_worker={train.cpus_per_worker} "
            f"asks for {wanted_cpus} CPUs but the local Ray has {int(cpus)}; lower train.num_workers or "
            "train.cpus_per_worker, start Ray with more num_cpus, or set RAY_ADDRESS to a larger cluster"
        )
    if problems:
        raise ConfigError("; and ".join(problems))


def worker_bundle(cfg: RunConfig) -> dict[str, float]:
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}


def cluster_fits(have: dict[str, float], bundle: dict[str, float], workers: int) -> bool:
    """Whether a cluster with `have` resources in total could hold `workers` workers of `bundle`
    (by totals: nodes are not bin-packed here; Ray Train's placement does that)."""
    return all(have.get(name, 0) >= amount * workers for name, amount in bundle.items())


def wait_for_cluster(cfg: RunConfig, *, timeout_s: float, poll_s: float = 2.0) -> None:
    """Ask the cluster's autoscaler (if any) for the workers and wait until the cluster has them."""
    import ray
    from ray.autoscaler.sdk import request_resources

    bundle, workers = worker_bundle(cfg), cfg.train.min_workers or cfg.train.num_workers
    if cluster_fits(ray.cluster_resources(), bundle, workers):
        return
    log.info("waiting up to %.0f s for the cluster to provide %d workers of %s", timeout_s, workers, bundle)
    request_resources(bundles=[bundle] * workers)  # a hint an autoscaler acts on; nothing without one
    deadline = time.monotonic() + timeout_s
    poll_s = min(poll_s, max(timeout_s / 10, 0.05))
    try:
        while time.monotonic() < deadline:
            time.sleep(poll_s)
            if cluster_fits(ray.cluster_resources(), bundle, workers):
                return
        cluster = ray.cluster_resources()
        have = {k: cluster.get(k, 0) for k in bundle}
        gpu_hint = (" (set train.use_gpu=false and train.precision=fp32 for a CPU run)"
                    if cfg.train.use_gpu and not have.get("GPU") else "")
        raise ConfigError(
            f"the Ray cluster at {os.environ.get('RAY_ADDRESS')} has {_describe(have)} after "
            f"{timeout_s:.0f} s but {workers} workers need {_describe({k: v * workers for k, v in bundle.items()})}"
            f"{gpu_hint}; it has no autoscaler, or its autoscaler cannot add such nodes. Lower "
            "train.num_workers, or raise train.cluster_wait_s for a slow autoscaler"
        )
    finally:
        request_resources(bundles=[])  # Ray Train's own placement request takes over


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))


def prepare_cluster(cfg: RunConfig, forward_env: dict[str, str] | None = None) -> None:
    """Join or start Ray and refuse a request it cannot place; callable early (before model
    loading or an MLflow run) and again by `launch`, which does both anyway."""
    ensure_ray(cfg, forward_env)
    check_resources(cfg)


def scaling_config(cfg: RunConfig):
    """Workers ask for GPUs exactly when the config says so (never from the GPUs present now: an
    autoscaling cluster starts with none). With train.min_workers the group is elastic: Ray Train
    starts it with as many workers as it can place between min and max, and resizes it on failure;
    each (re)start resumes through a universal checkpoint when the count changed."""
    import ray.train

    train = cfg.train
    gpu = train.use_gpu
    workers = train.num_workers if train.min_workers is None else (train.min_workers, train.num_workers)
    return ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=gpu,
        resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if gpu else {})},
    )


def launch(cfg: RunConfig, data_dir: str, *, storage_uri: str, name: str, mlflow_run_id: str | None,
           tracking_uri: str | None, frozen: dict, dataset_content_id: str = "",
           allow_new_data: bool = False, forward_env: dict[str, str] | None = None) -> LaunchResult:
    """Run training to cfg.train.max_steps and return the final checkpoint.

    Ray keeps the run under `storage_uri`/`name` (local or s3://; on a cluster it must be storage
    every node reaches). A launch under the name of an earlier one (`ldmflow train --resume`)
    continues from that run's latest checkpoint: see training.runtime.checkpointing.checkpoint_directory.
    """
    if tracking_uri:
        # The payload is pickled into Ray's state: credentials travel in the environment (the
        # driver's, which a local Ray inherits, or --forward-credentials), never in it.
        tracking_uri, creds = split_credentials(tracking_uri)
        os.environ.update(creds)
    prepare_cluster(cfg, forward_env)
    with stopping.stop_board() as board:
        return _launch(cfg, data_dir, storage_uri=storage_uri, name=name, mlflow_run_id=mlflow_run_id,
                       tracking_uri=tracking_uri, frozen=frozen, dataset_content_id=dataset_content_id,
                       allow_new_data=allow_new_data, board=board)


def _launch(cfg: RunConfig, data_dir: str, *, storage_uri: str, name: str, mlflow_run_id: str | None,
            tracking_uri: str | None, frozen: dict, dataset_content_id: str, allow_new_data: bool,
            board: stopping.BoardAddress | None) -> LaunchResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = ray_storage(storage_uri)
    run_location = storage.join(storage_uri, name)
    marker = storage.join(run_location, f".ldmflow-driver-{secrets.token_hex(8)}")
    storage.storage_for(marker).put_bytes(marker, b"")
    payload = WorkerPayload(
        config=cfg, data=str(data_dir), frozen=frozen, run_location=run_location,
        mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri, sample_log=os.environ.get(SAMPLE_LOG_ENV),
        dataset_content_id=dataset_content_id, allow_new_data=allow_new_data,
        # Workers on other nodes must reach the same S3 endpoint as this driver (s3:// data and storage).
        storage_env=storage.env_for_workers(), driver_marker=marker, stop_board=board,
    )
    trainer = TorchTrainer(
        worker_entry(payload),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[StopOnPreflightFailure()],
        ),
    )
    log.info("training %s on %s %s workers (ZeRO-%d), checkpoints in %s", name, cfg.train.num_workers
             if cfg.train.min_workers is None else f"{cfg.train.min_workers}-{cfg.train.num_workers}",
             "GPU" if cfg.train.use_gpu else "CPU", cfg.train.zero_stage, storage.join(storage_uri, name))
    try:
        result = _fit(trainer)
    finally:
        storage.storage_for(marker).delete(marker)
    if (stop_step := stopping.stopped_at()) is not None:
        _raise_stopped(stop_step, payload.run_location, cfg.train.max_steps)
    registered = checkpoint_uri(result.checkpoint) if result.checkpoint is not None else None
    return LaunchResult(checkpoint=final_checkpoint(registered, payload.run_location, cfg.train.max_steps),
                        metrics=dict(result.metrics or {}))


def _raise_stopped(stop_step: int, run_location: str, max_steps: int) -> None:
    """After a requested stop: the workers saved the stop step and returned, unless training reached
    its end first (then the run finishes as usual)."""
    latest = latest_verified_checkpoint(run_location)
    if latest is not None and latest.step == max_steps:
        return
    saved = latest is not None and latest.step == stop_step
    log.warning("training stopped on request at step %d; %s", stop_step,
                f"its checkpoint {latest.uri} is where --resume continues" if saved
                else f"no checkpoint of that step (latest: {'none' if latest is None else latest.step})")
    raise stopping.TrainingStopped(stop_step if saved else None)


def _fit(trainer):
    """trainer.fit(), with a worker's failed pre-flight raised as itself (one line for the CLI)."""
    from ray.train import ControllerError

    try:
        result = trainer.fit()
    except ControllerError as e:
        if isinstance(e.controller_failure, PreflightError):
            raise e.controller_failure from None
        raise
    if result.error is not None:
        raise result.error
    return result


def final_checkpoint(registered: str | None, run_location: str, max_steps: int) -> str:
    """The run's outcome: its newest verified checkpoint, which is the final step's. Ray reports the
    last checkpoint it registered, and registers one only after every rank's upload finished and its
    controller next polled: when the final checkpoint is complete in storage but Ray never registered
    it (a worker or the controller went down in between), Ray's is an older step, and exporting it
    would publish an older model than the run trained."""
    latest = latest_verified_checkpoint(run_location)
    if latest is not None and latest.step == max_steps:
        if registered != latest.uri:
            log.warning("the final step-%d checkpoint %s is complete but Ray reported %s; the run's outcome is the "
                        "final one", latest.step, latest.uri, registered)
        return latest.uri
    raise RuntimeError(f"training finished without a verified step-{max_steps} checkpoint in {run_location} "
                       f"(newest: {'none' if latest is None else f'step {latest.step}'}; Ray reported {registered})")
