"""Prefect's local server for flow tests, and reading back what it recorded."""

from __future__ import annotations

import anyio
import pytest


@pytest.fixture(scope="module")
def prefect_server():
    """Prefect starts its local server on the first flow run; stopped here while pytest still captures
    output (its atexit hook would log to a closed stream), once the logs queued for it are sent."""
    yield
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    # Logs still queued for the API go before the server does (else: "Error logging to API" at exit).
    APILogWorker.drain_all(timeout=10)
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


def task_runs(flow_run_id) -> list:
    """The task runs of a flow run, as Prefect's server knows them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return anyio.run(read)


def artifact_text(flow_run_id, key: str) -> str:
    """The markdown artifact `key` the flow run published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return found

    found = anyio.run(read)
    assert found, f"flow run {flow_run_id} published no artifact {key!r}"
    return found[-1].data
