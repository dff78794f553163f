"""MLflow plumbing of a training run: its experiment, the names of what it records, the commit it
ran, and a metric logger that never stalls training. Where the store is: training.locations."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from training.locations import default_artifact_location

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config.json"
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
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


class BufferedMetricLogger:
    """Batches metrics to MLflow and keeps them when the server is down.

    A tracking-server outage must not abort or stall a training run, so a failed flush keeps the
    metrics (up to `max_buffer`, oldest dropped first and counted) and the next flush retries.
    """

    def __init__(self, run_id: str, uri: str, *, flush_every: int = 50, max_buffer: int = 100_000):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.flush_every = flush_every
        self.max_buffer = max_buffer
        self.pending: list = []
        self.dropped = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        overflow = len(self.pending) - self.max_buffer
        if overflow > 0:
            del self.pending[:overflow]
            self.dropped += overflow
        if len(self.pending) >= self.flush_every:
            self.flush()

    def last_logged_step(self, key: str) -> int:
        """The highest step of `key` already in the run (0 if none or the store is unreachable)."""
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception as e:  # an outage: the worst case is a step logged twice, never a stall
            log.warning("could not read %s's history from MLflow: %s", key, e)
            return 0

    def flush(self) -> bool:
        while self.pending:
            chunk = self.pending[:1000]  # MLflow's log_batch limit
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as e:  # any transport or server error: keep the data, train on
                log.warning("MLflow unreachable, %d metrics buffered: %s", len(self.pending), e)
                return False
            del self.pending[: len(chunk)]
        return True
