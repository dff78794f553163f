"""MLflow plumbing of a training run: its experiment, the names of what it records, the commit it
ran, and a metric logger that never stalls training. Where the store is: training.locations."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from training.errors import TrackingUnavailable
from training.locations import default_artifact_location

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config.json"
DEEPSPEED_CONFIG_ARTIFACT = "deepspeed_config.json"
"""The DeepSpeed config the engine was built with (rank 0 logs it when the engine is built)."""
"""A training run's resolved config, as an MLflow artifact (what resume and evaluate read back)."""
STORAGE_TAG = "ray_storage"
"""A training run's tag naming the storage its checkpoints are under (what resume reads back)."""


def ensure_experiment(name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location())


def git_commit() -> str:
    """Commit of this checkout; images without .git carry it in LDMFLOW_GIT_COMMIT (see infra/docker)."""
    if os.environ.get("LDMFLOW_GIT_COMMIT"):
        return os.environ["LDMFLOW_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


HTTP_RETRIES_CAP = 1
"""MLflow's own retries of one request inside training (its default is 7, backing off up to 120 s):
the flusher below retries with its own back-off, so one attempt may fail fast."""
HTTP_TIMEOUT_CAP = 10
"""Seconds one MLflow request may take inside training (MLflow's default: 120)."""


def cap_http_retries() -> None:
    """Lower MLflow's per-request retries and timeout in this process to the caps above (a lower
    value already set is kept). MLflow reads both at each request."""
    for name, cap in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES_CAP), ("MLFLOW_HTTP_REQUEST_TIMEOUT",
                                                                              HTTP_TIMEOUT_CAP)):
        try:
            now = int(os.environ[name])
        except (KeyError, ValueError):
            now = cap
        os.environ[name] = str(min(now, cap))


class BufferedMetricLogger:
    """Delivers a run's metrics, images and tags to MLflow from a background thread, so training
    never waits on the tracking server.

    `log` appends to a bounded buffer and returns. The flusher thread sends what is buffered every
    `flush_interval` seconds (sooner once `flush_every` metrics wait); when the server cannot be
    reached it backs off exponentially (up to `max_backoff` s) and keeps the data. When the buffer
    is full the oldest entries are dropped: never silently. Every drop is counted, logged at WARNING,
    and once the server answers again recorded on the run (metric `tracking/dropped_metrics` and tag
    `tracking.dropped_metrics`, likewise for images). `close` waits at most `close_timeout` s; what is
    still undelivered then counts as dropped and is said.

    MLflow's own async logging is not used: its queue is unbounded and `end_run` joins it with no
    timeout, so an outage at the end of training would hang the run (mlflow/mlflow#20575).
    """

    DROPPED_METRICS = "tracking/dropped_metrics"
    DROPPED_IMAGES = "tracking/dropped_images"

    def __init__(self, run_id: str, uri: str, *, flush_every: int = 200, max_buffer: int = 100_000,
                 max_images: int = 16, flush_interval: float = 2.0, min_backoff: float = 0.5,
                 max_backoff: float = 30.0, close_timeout: float = 30.0, start: bool = True):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.flush_every = flush_every
        self.max_buffer = max_buffer
        self.max_images = max_images
        self.flush_interval = flush_interval
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.close_timeout = close_timeout
        self.pending: list = []
        self.images: list[tuple] = []
        self.dicts: dict[str, dict] = {}
        """JSON artifacts to log, by artifact file (the latest of each)."""
        self.tags: dict[str, str] = {}
        self.dropped = 0
        self.dropped_images = 0
        self.recorded_drops = (0, 0)
        self.failures = 0
        """Consecutive failed deliveries (0 while the server answers)."""
        self.last_step = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._busy = False
        self._closing = threading.Event()
        """Set by close: the flusher retries until the deadline instead of backing off."""
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="mlflow-flusher", daemon=True)
        if start:
            self._thread.start()

    # --- what the training loop calls: never waits on the network ---------------------------------

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            self.last_step = max(self.last_step, step)
            overflow = len(self.pending) - self.max_buffer
            if overflow > 0:
                del self.pending[:overflow]
                self._count_drop(overflow, 0)
            due = len(self.pending) >= self.flush_every
        if due:
            self._wake.set()

    def log_image(self, image, artifact_file: str) -> None:
        with self._lock:
            self.images.append((image, artifact_file))
            if len(self.images) > self.max_images:
                self.images.pop(0)
                self._count_drop(0, 1)
        self._wake.set()

    def log_dict(self, data: dict, artifact_file: str) -> None:
        with self._lock:
            self.dicts[artifact_file] = data
        self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self.tags.update(tags)
        self._wake.set()

    def _count_drop(self, metrics: int, images: int) -> None:
        # Called with the lock held.
        self.dropped += metrics
        self.dropped_images += images
        log.warning("MLflow unreachable and the buffer is full: dropped %d metrics and %d images so far "
                    "(recorded on the run once the server answers)", self.dropped, self.dropped_images)

    # --- reading the run back ------------------------------------------------------------------

    def last_logged_step(self, key: str, *, timeout: float = 120.0) -> int:
        """The highest step of `key` already in the run (0 when it has none). An outage is retried
        with back-off for up to `timeout` s; never read as 0, which would log steps twice."""
        deadline = time.monotonic() + timeout
        delay = self.min_backoff
        while True:
            try:
                return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
            except Exception as e:  # noqa: BLE001 - any failure is retried until the deadline
                if time.monotonic() + delay > deadline:
                    raise TrackingUnavailable(
                        f"could not read the last logged step of {key!r} of MLflow run {self.run_id} for "
                        f"{timeout:.0f} s ({type(e).__name__}: {_first_line(e)}); refusing to resume "
                        "blind, which would log steps twice") from None
                log.warning("MLflow unreachable reading %s's history, retrying in %.1f s: %s", key, delay,
                            _first_line(e))
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)

    # --- delivery --------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.min_backoff
        while True:
            if not self._closing.is_set():
                self._wake.wait(self.flush_interval)
            self._wake.clear()
            ok = self._deliver()
            closing = self._closing.is_set()
            if ok:
                delay = self.min_backoff
                if closing:
                    return
                continue
            if closing:
                if self._deadline_passed():
                    return
                # Training has ended and waits on this: retry often until the deadline (a server back
                # seconds before it must not meet a flusher asleep in a 30 s back-off).
                time.sleep(min(self.min_backoff, max(0.0, self._deadline - time.monotonic())))
                continue
            # Back off: the wake-ups of `log` must not turn an outage into a busy retry loop; a close
            # cuts the wait short.
            self._closing.wait(delay)
            delay = min(delay * 2, self.max_backoff)

    def _deadline_passed(self) -> bool:
        return time.monotonic() >= self._deadline

    def _deliver(self) -> bool:
        """Send everything buffered; False at the first failure (what was not sent stays buffered)."""
        with self._lock:
            self._busy = True
        try:
            while True:
                with self._lock:
                    chunk = self.pending[:1000]  # MLflow's log_batch limit
                if not chunk:
                    break
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                with self._lock:
                    # Only what was sent goes: entries dropped from the front meanwhile shift the list.
                    sent = {id(m) for m in chunk}
                    self.pending = [m for m in self.pending if id(m) not in sent]
            while True:
                with self._lock:
                    image = self.images[0] if self.images else None
                if image is None:
                    break
                self.client.log_image(self.run_id, image[0], artifact_file=image[1])
                with self._lock:
                    if self.images and self.images[0] is image:
                        self.images.pop(0)
            with self._lock:
                dicts = dict(self.dicts)
            for artifact_file, data in dicts.items():
                self.client.log_dict(self.run_id, data, artifact_file)
                with self._lock:
                    if self.dicts.get(artifact_file) is data:
                        del self.dicts[artifact_file]
            with self._lock:
                tags = dict(self.tags)
            if tags:
                from mlflow.entities import RunTag

                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
                with self._lock:
                    for k, v in tags.items():
                        if self.tags.get(k) == v:
                            del self.tags[k]
            self._record_drops()
        except Exception as e:  # noqa: BLE001 - any transport or server error: keep the data, train on
            self.failures += 1
            if self.failures == 1 or self.failures % 10 == 0:
                log.warning("MLflow unreachable (%d failed deliveries), %d metrics and %d images buffered: %s",
                            self.failures, len(self.pending), len(self.images), _first_line(e))
            return False
        finally:
            with self._lock:
                self._busy = False
        if self.failures:
            log.info("MLflow reachable again after %d failed deliveries", self.failures)
            self.failures = 0
        return True

    def _record_drops(self) -> None:
        with self._lock:
            counts, step = (self.dropped, self.dropped_images), self.last_step
        if counts == self.recorded_drops:
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, synchronous=True,
            metrics=[Metric(self.DROPPED_METRICS, counts[0], now, step), Metric(self.DROPPED_IMAGES, counts[1], now, step)],
            tags=[RunTag("tracking.dropped_metrics", str(counts[0])), RunTag("tracking.dropped_images", str(counts[1]))])
        self.recorded_drops = counts
        log.warning("recorded on MLflow run %s: %d metrics and %d images dropped during an outage", self.run_id,
                    *counts)

    # --- the end of training -------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Ask the flusher to send now and wait up to `timeout` s for an empty buffer. Returns whether
        everything was delivered; nothing is lost either way (the flusher keeps trying)."""
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = self._busy
            if not busy and self._empty():
                return True
            time.sleep(0.05)
        return self._empty()

    def _empty(self) -> bool:
        with self._lock:
            return not self.pending and not self.images and not self.tags and not self.dicts \
                and (self.dropped, self.dropped_images) == self.recorded_drops

    def close(self, timeout: float | None = None) -> int:
        """Deliver what is buffered within `timeout` s (default close_timeout), stop the flusher and
        return how many metrics were lost (dropped during the run or undelivered now), saying so."""
        timeout = self.close_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout + 1.0)
        else:
            self._deliver()
        with self._lock:
            left, left_images = len(self.pending), len(self.images)
            self.dropped += left
            self.dropped_images += left_images
            self.pending, self.images = [], []
        if self.dropped or self.dropped_images:
            log.warning("%d metrics and %d images never reached MLflow run %s (%d and %d undelivered when training "
                        "ended, %.0f s after asking)", self.dropped, self.dropped_images, self.run_id, left,
                        left_images, timeout)
        return self.dropped


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


FLOW_RUN_ENV = "LDMFLOW_FLOW_RUN_ID"
"""A flow run's id, handed to the library by pipelines/ (the library never imports Prefect)."""


def prefect_flow_run_id() -> str | None:
    """The id of the Prefect flow run this process works for, if any: LDMFLOW_FLOW_RUN_ID, or
    Prefect's own runtime context when Prefect is already loaded in this process (a flow run can
    only be active then; looked up by name so that the library does not depend on Prefect)."""
    if os.environ.get(FLOW_RUN_ENV):
        return os.environ[FLOW_RUN_ENV]
    if "prefect" not in sys.modules:
        return None
    try:
        flow_run = importlib.import_module("prefect.runtime.flow_run")
        found = flow_run.id
    except Exception:  # noqa: BLE001 - no active flow run, or a Prefect without the runtime module
        return None
    return str(found) if found else None


def dataset_input(uri: str, content_id: str, *, samples: int, shards: int, parts: int, skipped: dict[str, int]):
    """The dataset as an MLflow dataset input: source = its URI; digest = its content id, passed
    explicitly (a MetaDataset's default digest hashes name and source only, so every retrain on one
    prefix would look the same), cut to MLflow's 36-character digest limit (the full id is in the
    profile); its profile = sample, shard and part counts and skips by reason."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        @property
        def profile(self):
            return {"content_id": content_id, "samples": samples, "shards": shards, "parts": parts, "skipped": dict(skipped),
                    "skipped_total": sum(skipped.values())}

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile, sort_keys=True)}

    with warnings.catch_warnings():  # resolving a plain path warns about its source type guess
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
    return ShardDataset(source=source, name=uri.rstrip("/").rsplit("/", 1)[-1] or uri,
                        digest=content_id[:DATASET_DIGEST_CHARS])


DATASET_DIGEST_CHARS = 36
"""MLflow's limit on a dataset digest (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE)."""
