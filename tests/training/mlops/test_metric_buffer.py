"""Metric delivery survives a tracking-server outage without stalling the caller: a background
flusher with back-off and a bounded buffer; drops counted and recorded on the run; a bounded close;
the last logged step read from the server, retried through an outage and never guessed as 0."""

from __future__ import annotations

import logging
import socket
import threading
import time
from unittest import mock

import pytest
import requests
from mlflow import MlflowClient

from tests.mlflow_server import MlflowServer
from training.mlops.tracking import BufferedMetricLogger, TrackingUnavailable

FAST = {"flush_interval": 0.2, "min_backoff": 0.2, "max_backoff": 1.0}


@pytest.fixture(autouse=True)
def fail_fast(monkeypatch):
    # What StepLogger.for_worker sets inside training (cap_http_retries), a little tighter.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """One MLflow server for the module's outage tests (a start costs seconds of CPU): they stop, kill
    and restart it, each in an experiment of its own; `server` hands it over running."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        if server.proc is not None:
            server.stop()


@pytest.fixture
def server(module_server):
    """The module's server, up (started, or restarted on its port and store after an earlier test's outage)."""
    if module_server.proc is None:
        return module_server.start()
    if module_server.proc.poll() is not None:
        return module_server.restart()
    return module_server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_outage_is_buffered_bounded_counted_and_recorded(server, caplog):
    client = MlflowClient(tracking_uri=server.uri)
    run_id = client.create_run(client.create_experiment("buffer")).info.run_id
    logger = BufferedMetricLogger(run_id, server.uri, flush_every=5, max_buffer=30, **FAST)

    # Up: the flusher delivers on its own (no flush() call): the auto-flush path.
    for step in range(1, 11):
        logger.log({"loss": 1.0 / step, "lr": 1e-3}, step=step)
    wait_until(lambda: steps_of(client, run_id, "loss") == list(range(1, 11)), 30, "steps 1-10 delivered")

    # Down: log() still returns at once; the buffer keeps the newest 30 metrics, counts the rest.
    server.stop()
    # Not a timing (the 2 cores are shared): no request is ever sent from the thread that logs.
    senders = []
    real_send = requests.Session.send

    def send(session, request, **kwargs):
        senders.append(threading.get_ident())
        return real_send(session, request, **kwargs)

    with caplog.at_level(logging.WARNING, logger="training.mlops.tracking"), \
            mock.patch.object(requests.Session, "send", send):
        for step in range(11, 41):
            logger.log({"loss": 1.0 / step, "lr": 1e-3}, step=step)
            time.sleep(0.05)  # the flusher meets the outage, and backs off
    assert senders, "the flusher never tried during the outage"
    assert threading.get_ident() not in senders, "log() sent a request itself during an outage"
    assert logger.dropped == 30 and len(logger.pending) == 30  # 60 logged, 30 kept
    assert logger.failures >= 1
    assert any("dropped 30 metrics" in r.getMessage() for r in caplog.records)

    # Back: the kept 30 land, and the run says what was lost.
    server.restart()
    assert logger.flush(timeout=60) is True
    assert steps_of(client, run_id, "loss") == list(range(1, 11)) + list(range(26, 41))
    run = client.get_run(run_id)
    assert run.data.tags["tracking.dropped_metrics"] == "30"
    assert run.data.metrics[BufferedMetricLogger.DROPPED_METRICS] == 30
    assert logger.close(timeout=10) == 30

    # A restart reads the last logged step from the server, waiting out an outage (not 0).
    server.stop()
    reader = BufferedMetricLogger(run_id, server.uri, start=False, **FAST)
    back = threading.Thread(target=server.restart)
    threading.Timer(2.0, back.start).start()
    assert reader.last_logged_step("loss", timeout=120) == 40
    back.join(timeout=120)


def test_back_off_bounds_attempts_during_an_outage():
    logger = BufferedMetricLogger("0" * 32, f"http://127.0.0.1:{closed_port()}", flush_every=1,
                                  flush_interval=0.05, min_backoff=0.2, max_backoff=0.8)
    began = time.monotonic()
    while time.monotonic() - began < 3.0:
        logger.log({"loss": 1.0}, step=1)  # each call would wake the flusher, which must not hammer
        time.sleep(0.01)
    # Backing off 0.2, 0.4, 0.8, 0.8, ... s: about 5 attempts in 3 s, not one per log() call (300).
    assert 3 <= logger.failures <= 8, logger.failures
    logger.close(timeout=0)


def test_close_is_bounded_and_counts_what_is_left(caplog):
    logger = BufferedMetricLogger("0" * 32, f"http://127.0.0.1:{closed_port()}", **FAST)
    for step in range(1, 8):
        logger.log({"loss": 1.0, "lr": 1e-3}, step=step)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="training.mlops.tracking"):
        lost = logger.close(timeout=1.5)
    assert time.monotonic() - began < 5
    assert lost == 14 and logger.pending == []
    assert any("14 metrics and 0 images never reached MLflow" in r.getMessage() for r in caplog.records)


def test_last_logged_step_fails_clearly_when_never_readable():
    logger = BufferedMetricLogger("0" * 32, f"http://127.0.0.1:{closed_port()}", start=False, **FAST)
    began = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="refusing to resume blind"):
        logger.last_logged_step("loss", timeout=2)
    assert time.monotonic() - began < 8


def test_close_retries_at_once_when_the_server_is_back(server):
    """The server returns while the flusher sleeps in a long back-off and training ends: close retries
    at once instead of waiting out the back-off past its own deadline (what lost a whole run's
    metrics in the outage test when the server took 26 s to restart under load)."""
    client = MlflowClient(tracking_uri=server.uri)
    run_id = client.create_run(client.create_experiment("close")).info.run_id
    logger = BufferedMetricLogger(run_id, server.uri, flush_every=1, flush_interval=0.2, min_backoff=120,
                                  max_backoff=120)
    server.kill()
    for step in range(1, 6):
        logger.log({"loss": 1.0 / step}, step=step)
    wait_until(lambda: logger.failures >= 1, 30, "a failed delivery (the flusher now backs off 120 s)")
    server.restart()
    assert logger.close(timeout=30) == 0
    assert steps_of(client, run_id, "loss") == [1, 2, 3, 4, 5]


def test_a_checkpoint_settles_the_metrics_before_it(server):
    """StepLogger.settle (called before every checkpoint) delivers what is buffered while the server
    answers: a run killed after the checkpoint resumes past those steps and never logs them again
    (test_resume lost step 6 without it). In an outage it returns at once."""
    from training.runtime.metrics import SETTLE_S, StepLogger

    client = MlflowClient(tracking_uri=server.uri)
    run_id = client.create_run(client.create_experiment("settle")).info.run_id
    # Left alone, this flusher would send nothing for a minute.
    logger = BufferedMetricLogger(run_id, server.uri, flush_every=10_000, flush_interval=60)
    steps = StepLogger(logger)
    for step in range(1, 7):
        steps.log({"loss": 1.0 / step}, step=step)
    steps.settle()
    assert steps_of(client, run_id, "loss") == [1, 2, 3, 4, 5, 6]

    server.kill()
    logger.failures = 1  # as the flusher records a failed delivery
    steps.log({"loss": 0.1}, step=7)
    began = time.monotonic()
    steps.settle()
    assert time.monotonic() - began < SETTLE_S / 2  # it did not wait on a server that is down
    assert logger.close(timeout=0) == 1
