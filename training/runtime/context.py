"""What a worker is handed: who it is in the group (WorkerContext) and the driver's WorkerPayload."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from training.config import RunConfig
from training.runtime.stopping import BoardAddress


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_ray(cls) -> WorkerContext:
        """This Ray Train worker's rank, world size and device."""
        import ray.train
        import ray.train.torch

        train_ctx = ray.train.get_context()
        return cls(train_ctx.get_world_rank(), train_ctx.get_world_size(), ray.train.torch.get_device())


@dataclass(frozen=True, kw_only=True)
class WorkerPayload:
    """Everything the driver tells every worker, pickled to each by Ray (bound to the loop with
    functools.partial, so it never enters Ray's JSON run state)."""

    config: RunConfig
    """The resolved run config."""
    data: str
    """The dataset: an absolute local path (shared on a cluster) or s3:// prefix."""
    frozen: dict[str, str]
    """sha256 of the frozen VAE and text encoder the driver loaded; every worker must hold the same."""
    run_location: str
    """Where Ray keeps this run (storage URI / run name): the workers look there for the latest
    verified checkpoint."""
    mlflow_run_id: str | None = None
    """Rank 0 logs metrics to this run; None: nothing is logged."""
    tracking_uri: str | None = None
    """The MLflow tracking URI without credentials (training.locations.split_credentials): rank 0
    finds those in MLFLOW_TRACKING_USERNAME/PASSWORD of its environment."""
    sample_log: str | None = None
    """LDMFLOW_SAMPLE_LOG of the driver: a folder every rank logs its batches' keys to."""
    dataset_content_id: str = ""
    """The content id of `data` as the driver read it."""
    allow_new_data: bool = False
    """A checkpoint whose loader positions point into other data (its dataset_content_id differs)
    restarts the data at the next epoch instead of being refused (`--resume --allow-new-data`)."""
    storage_env: dict[str, str] = field(default_factory=dict)
    """The driver's S3 endpoint and region (data_prep.storage.env_for_workers), set in each worker.
    Never credentials: this payload is kept in Ray's state (training.runtime.cluster says how they go)."""
    stop_board: BoardAddress | None = None
    """Where the ranks ask whether to checkpoint and stop (training.runtime.stopping); None: never."""
    driver_marker: str | None = None
    """A file the driver wrote under run_location for this launch: a worker that cannot see it is
    not looking at the driver's storage (training.runtime.preflight)."""
