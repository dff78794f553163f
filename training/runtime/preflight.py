"""The pre-flight every worker runs before step 1: can this node read the data, write checkpoint
storage and reach the tracking server? Each node brings its own credentials and settings (or gets
the driver's with --forward-credentials), so the driver's own checks say nothing about it.

A failure is a PreflightError naming the rank, the node (host, IP, Ray node id) and every check
that failed, raised within seconds (short S3 and MLflow timeouts), not at the first shard read or
the first checkpoint upload `train.checkpoint_every` steps later. StopOnPreflightFailure makes Ray
Train end the run on it instead of restarting the worker group `train.max_failures` times into the
same failure.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import ray.train

from data_prep import storage
from data_prep.dataset import read_dataset
from training.checkpoint.run_storage import check_run_storage
from training.errors import ConfigError
from training.runtime.context import WorkerContext, WorkerPayload
from training.runtime.deepspeed_checks import check_nvme

log = logging.getLogger(__name__)


_S3_TIMEOUTS = {"max_attempts": 2, "connect_timeout": 3.0, "read_timeout": 5.0}
_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_HEAD_BYTES = 512
"""A tar header: what reading "a shard's first bytes" reads."""


class PreflightError(ConfigError):
    """A worker's node cannot do what training needs; the message names the node and the checks."""


def this_node() -> str:
    """"host (ip, Ray node <id>)" of the calling Ray worker."""
    import ray

    return (f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, "
            f"Ray node {ray.get_runtime_context().get_node_id()})")


def worker_preflight(payload: WorkerPayload, ctx: WorkerContext) -> None:
    """Run every check on this worker; raise one PreflightError naming the node and each failure."""
    for key, value in _MLFLOW_ENV.items():  # MLflow's default retries wait minutes on a dead server
        os.environ.setdefault(key, value)
    checks: list[tuple[str, Callable[[], None]]] = [
        ("read the data", lambda: check_data_readable(payload.data)),
        ("write checkpoint storage", lambda: check_storage(payload.run_location, payload.driver_marker)),
    ]
    if payload.mlflow_run_id:
        checks.append(("reach MLflow", lambda: check_tracking(payload.tracking_uri, payload.mlflow_run_id)))
    # NVMe offload writes to this node's own disk, with an op built from this node's libaio.
    checks.append(("offload to NVMe", lambda: check_nvme(payload.config.train)))
    failures = []
    for name, check in checks:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - every failure is reported, whatever raised it
            failures.append(f"cannot {name}: {_one_line(e)}")
    if failures:
        raise PreflightError(
            f"pre-flight failed on rank {ctx.rank}, node {this_node()}: {'; '.join(failures)}. Nodes use their own "
            "credentials and settings: give this node access (environment, profile or instance role), or pass "
            "--forward-credentials to hand it the driver's")
    log.info("rank %d pre-flight passed: data, checkpoint storage%s", ctx.rank,
             ", MLflow" if payload.mlflow_run_id else "")


def check_data_readable(data: str) -> None:
    """The dataset's index/manifest and the first bytes of its first shard."""
    fast = _fast_storage(data)
    fast.check_readable(data)
    shards = read_dataset(data).shards
    if shards:
        with fast.open_read(shards[0].uri) as f:
            f.read(_HEAD_BYTES)


def check_storage(run_location: str, driver_marker: str | None) -> None:
    """Write and delete a probe under the run (through both S3 clients: training.checkpoint.run_storage),
    and see the marker the driver wrote there: a local path that is not the driver's shared mount but
    a folder of this node's own passes the probe and fails here."""
    check_run_storage(run_location)
    if driver_marker and not _fast_storage(driver_marker).exists(driver_marker):
        raise storage.StorageError(
            f"{run_location} is not the driver's: the marker the driver wrote there ({driver_marker}) is missing on "
            "this node; use s3:// storage or a path on a mount every node shares")


def check_tracking(tracking_uri: str | None, run_id: str) -> None:
    """The run exists in the tracking store this node reaches (so it is the driver's store, and the
    credentials are accepted)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).get_run(run_id)


def _fast_storage(uri: str) -> storage.Storage:
    return storage.S3Storage(**_S3_TIMEOUTS) if storage.is_s3(uri) else storage.storage_for(uri)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:400] + "...") if len(text) > 400 else text or type(e).__name__


class StopOnPreflightFailure(ray.train.UserCallback):
    """Ray Train's controller calls this when workers raise; re-raising a PreflightError there ends
    the run (a controller error, which Ray Train never retries) instead of restarting the worker
    group into the same failure max_failures times."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        failed = sorted({str(e) for e in worker_exceptions.values() if isinstance(e, PreflightError)})
        if failed:
            raise PreflightError("; ".join(failed))
