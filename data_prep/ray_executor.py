"""Run shard tasks as Ray Data tasks on a cluster: the same `run_task`, spread over its nodes.

When to use which (also in the README): processes on one machine are the default and the fastest
way up to the cores of one box; Ray pays for start-up and scheduling, and pays off when the cluster
has more cores than one machine or when the source is remote (S3, HTTP) and many nodes can read it
at once. Shards are published by the tasks themselves, so the driver only collects small results.
"""

from __future__ import annotations

import logging

from data_prep import storage
from data_prep.shard_task import Task, TaskContext, TaskResult, run_task

log = logging.getLogger(__name__)


def _run_row(row: dict, ctx: TaskContext) -> dict:
    return {"result": run_task(row["task"], ctx)}


def run_tasks_on_ray(tasks: list[Task], ctx: TaskContext, address: str) -> list[TaskResult]:
    """Run every task once on the Ray cluster at `address` ("local" starts one on this machine)."""
    import ray

    if not ray.is_initialized():
        env = storage.env_for_workers()  # endpoint and region; nodes bring their own credentials
        ray.init(address=None if address == "local" else address, runtime_env={"env_vars": env} if env else None,
                 log_to_driver=False)
    log.info("running %d shard tasks on Ray (%s CPUs)", len(tasks), ray.cluster_resources().get("CPU"))
    import ray.data

    ds = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=max(1, len(tasks)))
    ds = ds.map(_run_row, fn_kwargs={"ctx": ctx}, num_cpus=1)
    return [row["result"] for row in ds.take_all()]
