"""The driver's writes after training (the checkpoint tag, the run's end) against a real MLflow
server that is down when training ends: retried until it is back, or one clear error naming what
is missing once the bound has passed, never a traceback from inside MLflow."""

from __future__ import annotations

import threading
import time

import pytest

from tests.mlflow_server import MlflowServer
from training.errors import TrackingUnavailable
from training.runtime import driver


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One MLflow server for the module: starting one costs seconds on 2 cores. The tests that kill it
    leave it down; the next test's `server` brings it back on the same port and store."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture
def server(shared_server, monkeypatch):
    if shared_server.proc is None or shared_server.proc.poll() is not None:  # an earlier test's outage
        shared_server.restart()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_server.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as training caps them: fail fast, retry here
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from training.locations import setup_mlflow

    setup_mlflow()
    return shared_server


# First: it needs the server up; the two below take it down (the next test restarts it).
def test_a_client_error_is_not_retried(server):
    import mlflow
    from mlflow.exceptions import MlflowException

    t0 = time.monotonic()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        driver.when_reachable(lambda: mlflow.MlflowClient().get_run("0" * 32), "lookup failed")
    assert time.monotonic() - t0 < 10


def test_an_outage_at_the_end_of_training_is_waited_out(server):
    import mlflow

    with driver.tracked_run(experiment_id="0") as run:
        server.kill()
        back = threading.Timer(3.0, server.restart)
        back.start()
        t0 = time.monotonic()
        driver.when_reachable(lambda: mlflow.set_tag("checkpoint", "/ckpt/step-2"), "tag failed")
        waited = time.monotonic() - t0
    back.join()
    finished = mlflow.MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["checkpoint"] == "/ckpt/step-2"
    assert 2.5 < waited < 60, waited
    assert mlflow.active_run() is None


def test_an_outage_past_the_bound_is_one_clear_error(server, monkeypatch):
    import mlflow

    monkeypatch.setattr(driver, "FINAL_WRITE_S", 3.0)
    with pytest.raises(TrackingUnavailable) as failed, driver.tracked_run(experiment_id="0"):
        server.kill()
        driver.when_reachable(lambda: mlflow.set_tag("checkpoint", "/ckpt/step-2"),
                              "training finished (final checkpoint /ckpt/step-2) but nothing was registered")
    message = str(failed.value)
    assert message.startswith("training finished (final checkpoint /ckpt/step-2) but nothing was registered: "
                              f"the MLflow server at {server.uri} did not answer for 3 s"), message
    assert "\n" not in message
    assert mlflow.active_run() is None
