"""Launching the workers: a Ray ``TorchTrainer`` running ``train_loop_per_worker`` on N ranks.

With ``RAY_ADDRESS`` set it joins that cluster; otherwise it starts Ray on this machine. Only
resources change between the two: the loop, config and checkpoints are the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep import storage
from training.config import RunConfig

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
    # the workers share the cores, which is what a CPU smoke run wants.
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


def use_gpu(cfg: RunConfig) -> bool:
    import ray

    if cfg.train.use_gpu is not None:
        return cfg.train.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def check_resources(cfg: RunConfig, gpu: bool) -> None:
    """On a fixed-size local Ray, a request it can never satisfy would wait forever: refuse it.
    (A cluster named by RAY_ADDRESS may autoscale, so there the request stands.)"""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources().get("GPU", 0)
    if gpu and have < cfg.train.num_workers:
        raise RuntimeError(
            f"train.num_workers={cfg.train.num_workers} GPU workers requested but local Ray has {int(have)} GPUs; "
            "lower train.num_workers or set train.use_gpu=false"
        )


def launch(cfg: RunConfig, data_dir: str, *, storage_dir: Path, name: str, mlflow_run_id: str | None,
           tracking_uri: str | None, frozen: dict) -> LaunchResult:
    """Run training to cfg.train.max_steps and return the final checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.worker import train_loop_per_worker

    ensure_ray(cfg)
    gpu = use_gpu(cfg)
    check_resources(cfg, gpu)
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
