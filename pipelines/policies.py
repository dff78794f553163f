"""How flow tasks fail, retry, time out and cache.

Retries: a failure worth retrying is one a second try can outlive (the network, storage, a lost Ray
node, an MLflow server answering 5xx); a deterministic one (bad data, a bad config) fails the same
way every time, so it fails the task at once. `retry_transient` is the tasks' `retry_condition_fn`.

Caching: a task's cache key is built from the identities of what it reads (a dataset's content id, a
config's hash, a model version), never from a location: a bare s3:// prefix names the same string
before and after new data lands, and would hit the cache with stale results. Results are persisted
where every worker reaches them (`result_storage`), so a re-run on another worker finds them too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.errors import DataPrepError
from training.errors import ConfigError, DataError, EvaluationError, ModelLoadError, PromptFileError
from training.locations import redact, runs_dir, tracking_uri

DETERMINISTIC: tuple[type[BaseException], ...] = (DataError, ConfigError, DataPrepError, EvaluationError,
                                                  ModelLoadError, PromptFileError)
"""Errors that name bad input: the same input fails the same way, so no retry (checked first: a
ModelPathError is also a FileNotFoundError, an OSError)."""

RESULT_STORAGE_ENV = "LDMFLOW_RESULT_STORAGE"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what caused it (Ray Train wraps a worker's error in TrainingFailedError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _transient_types() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        import botocore.exceptions as boto

        kinds += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:
        pass
    try:
        import ray.exceptions as rex

        kinds += [rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError, rex.ObjectLostError,
                  rex.OwnerDiedError, rex.LocalRayletDiedError, rex.RaySystemError]
    except ImportError:
        pass
    from training.errors import TrackingUnavailable

    kinds.append(TrackingUnavailable)
    return tuple(kinds)


def _mlflow_unavailable(exc: BaseException) -> bool:
    """An MLflow server that did not answer or answered 5xx; not an MlflowException raised locally
    (MLflow's default error code maps to 500 too, hence the request check)."""
    try:
        from mlflow.exceptions import MlflowException, RestException
    except ImportError:
        return False
    if isinstance(exc, RestException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, MlflowException) and str(exc.message).startswith("API request to") and (
        "failed with exception" in exc.message or "failed with timeout exception" in exc.message
        or any(f"failed with error code {code}" in exc.message for code in range(500, 600)))


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: nothing in the chain names bad input or is the task's own
    timeout (a TimeoutError, so an OSError, but a second try would run as long), and something in it
    is a network, storage, Ray node or MLflow 5xx failure."""
    from prefect.task_engine import TaskRunTimeoutError

    chain = list(_chain(exc))
    if any(isinstance(e, (*DETERMINISTIC, TaskRunTimeoutError)) for e in chain):
        return False
    transient = _transient_types()
    return any(isinstance(e, transient) or _mlflow_unavailable(e) for e in chain)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry only transient failures (is_transient)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001  (any failure: the task's own exception, re-raised by its state)
        return is_transient(exc)
    return False


# --- caching ------------------------------------------------------------------------------------


def identity_key(**identities: Any) -> str:
    """sha256 of the named identities (content ids, config hashes, versions), as a cache key. The
    tracking server is part of it: a run id or model version means something only on its server."""
    blob = json.dumps({**identities, "tracking": redact(tracking_uri())}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def result_storage_uri(uri: str | None = None) -> str:
    """Where task results (and cache records) go: `uri`, else $LDMFLOW_RESULT_STORAGE, else
    <runs dir>/prefect-results. Every worker that may run a retry must reach it (a shared mount or
    s3://)."""
    return uri or os.environ.get(RESULT_STORAGE_ENV) or str(runs_dir() / "prefect-results")


def result_storage(uri: str | None = None):
    """What a task's `result_storage` takes for result_storage_uri(uri): a local folder as a Path;
    an s3:// prefix as a filesystem block over the project's storage layer (boto3, AWS_ENDPOINT_URL; no
    s3fs needed), saved on the Prefect server under a name derived from the URI, since Prefect accepts
    only saved blocks (a worker elsewhere loads it by its id)."""
    from data_prep import storage

    uri = result_storage_uri(uri)
    if not storage.is_s3(uri):
        return Path(storage.absolute(uri))
    from pipelines.result_store import ObjectStoreFileSystem

    block = ObjectStoreFileSystem(basepath=uri)
    block.save(f"ldmflow-results-{hashlib.sha256(uri.encode()).hexdigest()[:12]}", overwrite=True)
    return block
