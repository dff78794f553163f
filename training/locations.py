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


PROXIED_ARTIFACTS_ENV = {
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
}
"""Every artifact byte goes through the tracking server's proxy, so clients need the tracking URI only.

A server with `--artifacts-destination s3://...` advertises multipart uploads and downloads in its
`/server-info`, and an MLflow 3.17 client that has neither variable set follows it: it then downloads
every artifact file (any size) and uploads files of MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE (500 MB)
or more through presigned URLs straight to the S3 endpoint *as the server names it* (e.g.
http://seaweedfs:8333 inside a cluster), which a client outside the cluster cannot reach; read in
mlflow/store/artifact/mlflow_artifacts_repo.py. Set, not defaulted, by MLflow; here a default: a
deployment whose clients all reach S3 may export `true` for parallel transfers that bypass the server."""


def setup_mlflow() -> str:
    import mlflow

    for key, value in PROXIED_ARTIFACTS_ENV.items():
        os.environ.setdefault(key, value)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri
