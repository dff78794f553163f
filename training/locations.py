"""Where a run's state lives on this machine: the runs directory and the MLflow store.

The standard ``MLFLOW_TRACKING_URI`` decides which MLflow every command talks to. Without it the
embedded default is a SQLite store with a local artifact folder under the runs directory
(``./runs`` unless ``LDMFLOW_RUNS_DIR`` says otherwise). A base module: every layer may use it.
"""

from __future__ import annotations

import os
import urllib.parse
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


CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """`uri` without its `user:token@` part, and that part as MLflow's own credential variables
    (which MLflow's HTTP client reads on every request)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, {}
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    clean = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    creds = {"MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(parts.username or "")}
    if parts.password is not None:
        creds["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return clean, creds


def redact(uri: str) -> str:
    """`uri` fit for a log line or an error: its userinfo, if any, replaced by `***`."""
    clean, creds = split_credentials(uri)
    if not creds:
        return uri
    parts = urllib.parse.urlsplit(clean)
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc))


def setup_mlflow() -> str:
    """Point MLflow at `tracking_uri()` and return it. Credentials in the URI (`user:token@`) move
    to MLFLOW_TRACKING_USERNAME/PASSWORD in this process's environment and out of the URI, which
    then goes wherever it is needed (Ray's worker payload, MLflow's log lines, tags) without them;
    a local Ray started after this, and `--forward-credentials`, hand the variables to the workers."""
    import mlflow

    for key, value in PROXIED_ARTIFACTS_ENV.items():
        os.environ.setdefault(key, value)
    uri, creds = split_credentials(tracking_uri())
    if creds:
        os.environ.update(creds)
        os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri
