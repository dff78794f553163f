"""What the pipelines' flow tests share for the whole package: Prefect's local server and a local Ray.

Both are process-wide singletons that the code under test starts itself on first use (Prefect on the first
flow run, training.runtime.launcher.ensure_ray on the first training); each module used to stop them at its
end, so the next module paid their start again (several seconds each on 2 cores). Package scope
(tests/pipelines/__init__.py) stops them after this folder's last test, before any other folder's tests run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
def prefect_server() -> Iterator[None]:
    """Prefect starts its local server on the first flow run; stopped here while pytest still captures
    output (its atexit hook would log to a closed stream), once the logs queued for it are sent."""
    yield
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    # Logs still queued for the API go before the server does (else: "Error logging to API" at exit).
    APILogWorker.drain_all(timeout=10)
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


@pytest.fixture(scope="package")
def local_ray() -> Iterator[None]:
    """The local Ray (with its dashboard's Jobs API) that the flows' training tasks start, started the same
    way (training.runtime.jobs.jobs_address) but sized for the most workers any module here trains with (2,
    the tiny preset's): a module that ran first with 1 worker would otherwise leave a Ray too small for the
    next one's 2."""
    import ray
    from ray.job_submission import JobStatus

    from training.config import load_config
    from training.runtime.jobs import jobs_address, jobs_client

    client = jobs_client(jobs_address(load_config(ROOT / "configs" / "tiny.yaml")))
    # On a loaded machine the dashboard's job agent registers seconds after ray.init, and a job submitted
    # before then is refused ("No available agent to submit job", HTTP 500): wait for it once, here, with a
    # job that does nothing.
    deadline = time.monotonic() + 180
    while True:
        try:
            probe = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    while not client.get_job_status(probe).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(probe) == JobStatus.SUCCEEDED, client.get_job_logs(probe)
    yield
    ray.shutdown()
