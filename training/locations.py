"""Where a run's state lives on this machine: the runs directory and the MLflow store.

The standard ``MLFLOW_TRACKING_URI`` decides which MLflow every command talks to. Without it the
embedded default is a SQLite store with a local artifact folder under the runs directory
(``./runs`` unless ``LDMFLOW_RUNS_DIR`` says otherwise). A base module: every layer may use it.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNS_DIR_ENV = "LDMFLOW_RUNS_DIR"


def runs_dir() -> Path:
    """Project run directory (``./runs`` unless ``LDMFLOW_RUNS_DIR`` says otherwise), absolute."""
    return Path(os.environ.get(RUNS_DIR_ENV, "runs")).resolve()


def embedded_uri() -> str:
    return f"sqlite:///{runs_dir() / 'mlflow' / 'mlflow.db'}"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()
    if uri == embedded_uri():
        (runs_dir() / "mlflow").mkdir(parents=True, exist_ok=True)
    return uri


def default_artifact_location() -> str | None:
    """Artifacts beside the embedded SQLite store; any other store decides its own.

    (Checked by URI, not by the env var: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI.)
    """
    if tracking_uri() != embedded_uri():
        return None
    return (runs_dir() / "mlflow" / "artifacts").as_uri()


def setup_mlflow() -> str:
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri
