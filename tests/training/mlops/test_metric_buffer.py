"""Metrics survive a tracking-server outage: buffered, bounded, delivered once MLflow is back."""

from __future__ import annotations

import socket
import time

from mlflow import MlflowClient

from training.mlops.tracking import BufferedMetricLogger


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_outage_keeps_metrics_and_does_not_stall(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = BufferedMetricLogger("0" * 32, f"http://127.0.0.1:{closed_port()}", flush_every=10_000, max_buffer=5)
    for step in range(4):
        logger.log({"loss": 1.0 / (step + 1), "lr": 1e-3}, step=step)
    started = time.monotonic()
    assert logger.flush() is False
    assert time.monotonic() - started < 10
    assert len(logger.pending) == 5 and logger.dropped == 3  # bounded: oldest dropped, and counted

    # The server is back (here: a real SQLite store): the buffered metrics land, in order.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("buffer", artifact_location=(tmp_path / "a").as_uri()))
    logger.run_id, logger.client = run.info.run_id, client
    assert logger.flush() is True and logger.pending == []
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(2, 0.3333), (3, 0.25)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == [1, 2, 3]
