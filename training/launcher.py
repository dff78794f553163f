"""Launching the workers: a Ray ``TorchTrainer`` running ``train_loop_per_worker`` on N ranks.

With ``RAY_ADDRESS`` set it joins that cluster; otherwise it starts Ray on this machine. Only
resources change between the two: the loop, config and checkpoints are the same. Workers ask for
GPUs exactly when ``train.use_gpu`` says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep import storage
from training.config import RunConfig
from training.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LaunchResult:
    checkpoint_dir: Path
    """The final committed checkpoint (a local path for a local storage path)."""
    metrics: dict


def ensure_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # A local Ray gets enough logical CPUs for the requested workers even on a 2-core machine:
    # the workers share the cores, which is what a CPU smoke run wants. (So check_resources' CPU
    # check never fires for a Ray started here; GPUs are whatever Ray detects on this machine.)
    wanted = cfg.train.num_workers * cfg.train.cpus_per_worker + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=False,
             runtime_env={"worker_process_setup_hook": "training.launcher.quiet_ray_internals"})


def quiet_ray_internals() -> None:
    """Runs in every local Ray worker process at start-up.

    Ray Train v2's PlacementGroupCleaner polls the State API, which is served by the dashboard; a
    local Ray started without it (no ray[default] extras: fewer processes on a small machine) makes
    the cleaner warn every second for the whole run. Its only job here, freeing placement groups
    if the controller dies, still works: ray.shutdown() frees them too.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def check_resources(cfg: RunConfig) -> None:
    """Refuse, with one message, a request a fixed-size local Ray can never satisfy: Ray would wait
    for it forever. A cluster named by RAY_ADDRESS may autoscale (the shipped specs start with zero
    GPU nodes), so there the request stands and Ray waits for the autoscaler to add nodes."""
    if os.environ.get("RAY_ADDRESS"):
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
    problems = []
    if train.use_gpu and gpus < train.num_workers:
        cpu_run = "set train.use_gpu=false for a CPU run"
        if train.precision != "fp32":
            cpu_run += (f" (with train.precision=fp32, or train.allow_cpu_half_precision=true to keep "
                        f"{train.precision})")
        fewer = f", lower train.num_workers to {int(gpus)} to use the GPUs here" if gpus >= 1 else ""
        problems.append(
            f"train.use_gpu=true asks for {train.num_workers} GPU workers (train.num_workers={train.num_workers}) "
            f"but the local Ray has {int(gpus)} GPUs: {cpu_run}{fewer}, "
            "or set RAY_ADDRESS to a Ray cluster with (or autoscaling to) GPU nodes"
        )
    wanted_cpus = train.num_workers * train.cpus_per_worker
    if cpus < wanted_cpus:
        problems.append(
            f"train.num_workers={train.num_workers} x train.cpus_per_worker={train.cpus_per_worker} "
            f"asks for {wanted_cpus} CPUs but the local Ray has {int(cpus)}; lower train.num_workers or "
            "train.cpus_per_worker, start Ray with more num_cpus, or set RAY_ADDRESS to a larger cluster"
        )
    if problems:
        raise ConfigError("; and ".join(problems))


def prepare_cluster(cfg: RunConfig) -> None:
    """Join or start Ray and refuse a request it cannot place; callable early (before model
    loading or an MLflow run) and again by `launch`, which does both anyway."""
    ensure_ray(cfg)
    check_resources(cfg)


def launch(cfg: RunConfig, data_dir: str, *, storage_dir: Path, name: str, mlflow_run_id: str | None,
           tracking_uri: str | None, frozen: dict) -> LaunchResult:
    """Run training to cfg.train.max_steps and return the final checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.worker import train_loop_per_worker

    prepare_cluster(cfg)
    # From the config, never from the GPUs present now: an autoscaling cluster starts with none.
    gpu = cfg.train.use_gpu
    payload = {
        "config": cfg.to_dict(),
        "data": str(data_dir),
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "frozen": frozen,
        # Workers on other nodes must reach the same S3 endpoint as this driver (s3:// data).
        "storage_env": storage.env_for_workers(),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    log.info("training %s on %d %s workers (ZeRO-%d)", name, cfg.train.num_workers, "GPU" if gpu else "CPU",
             cfg.train.zero_stage)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return LaunchResult(checkpoint_dir=Path(result.checkpoint.path), metrics=dict(result.metrics or {}))
