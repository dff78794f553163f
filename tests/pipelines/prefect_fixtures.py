"""Reading back what Prefect's local server recorded (the server itself: conftest.py's `prefect_server`)."""

from __future__ import annotations

import anyio


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
