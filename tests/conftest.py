"""Session-wide isolation: every test run writes under its own temporary runs directory and talks
only to servers it starts itself on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.mlflow_server import MlflowServer
    from tests.s3_server import S3Server
    from tests.training.mlops.consumer_fixtures import Registered


def pytest_configure(config):
    runs = Path(tempfile.mkdtemp(prefix="ldmflow-test-runs-"))
    config._ldmflow_runs = runs
    os.environ["LDMFLOW_RUNS_DIR"] = str(runs)
    os.environ["PREFECT_HOME"] = str(runs / "prefect")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(key, None)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray Train's waits, set before any Ray starts (its nodes, workers and controller inherit them).
    # The controller polls the worker group every 2 s, so every start, finish and failure is seen up to
    # 2 s late; each of the many short runs here pays that several times. 0.5 s costs little CPU.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Every worker-group start also spawns a preemption-watcher actor (one more Python process on 2
    # cores) that polls for node drains; no test drains a node.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def pytest_unconfigure(config):
    # The session's MLflow store, checkpoints and exports: about 2 GB after a full run.
    runs = getattr(config, "_ldmflow_runs", None)
    if runs is not None:
        shutil.rmtree(runs, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_mlflow_experiment_carried_over() -> Iterator[None]:
    """`mlflow.set_experiment` keeps the experiment's id in the process (and in MLFLOW_EXPERIMENT_ID);
    a later test's `start_run()` against its own fresh server would then ask it for an experiment that
    only the earlier server had ("No Experiment with id=1")."""
    yield
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        fluent._active_experiment_id = None


# ---------------------------------------------------------------------------------------------- S3
# One SeaweedFS server per test session, started only when a test asks for it (about 1 s).

_AWS_ISOLATION_UNSET = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                        "AWS_SECURITY_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_REGION")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session; see tests/s3_server.py."""
    from tests.s3_server import S3Server

    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """Point the standard AWS environment at `s3_server` for one test (and only at it: no profile, no
    ~/.aws files, no instance metadata), with data_prep.storage's cached clients forgotten before and after."""
    from data_prep import storage

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in _AWS_ISOLATION_UNSET:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.reset_clients()
    yield s3_server
    storage.reset_clients()


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A fresh, empty bucket on the test S3 server (env already pointing at it)."""
    return s3_env.make_bucket()


# ------------------------------------------------------------------------------------------ MLflow


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One real MLflow server (SQLite store, local proxied artifacts) for every test of the session that
    only talks to a server and never stops it: each start costs seconds of CPU on the shared cores.
    Its users keep apart by name (each module its own experiments and registered models); a test that
    stops, kills or configures its server starts its own MlflowServer. Nothing here points this process
    at it: each user sets MLFLOW_TRACKING_URI itself."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-session")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registered(mlflow_server: MlflowServer, tmp_path_factory) -> Registered:
    """The session's MLflow server with one tiny registered model (alias champion) that the consumer
    tests of every module read; see tests/training/mlops/consumer_fixtures.py."""
    from tests.training.mlops.consumer_fixtures import serve_registered

    return serve_registered(mlflow_server, tmp_path_factory)
