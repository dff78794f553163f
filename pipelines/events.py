"""Prefect events the pipeline emits, and what they mean to the deployments in prefect.yaml.

`ldmflow.dataset.new-items` says "this source holds items that this dataset does not": the `retrain`
deployment's trigger (an automation on the Prefect server) starts a retrain run with the event's
`source` and `dataset` as parameters. It is emitted only when there is something new, so a trigger on
it never starts a retrain that would find nothing to train on.

Who emits it: the `watch-source` sensor flow (pipelines/sensor.py), which counts new items by content
without writing anything, so the retrain run itself shards them. (A shard step inside `retrain` must
not emit it: the event would start a second retrain for the items the first is already training on.)
"""

from __future__ import annotations

import hashlib
from typing import Any

NEW_ITEMS_EVENT = "ldmflow.dataset.new-items"
"""The event name the `retrain` deployment's trigger expects (prefect.yaml)."""
RESOURCE_PREFIX = "ldmflow.dataset."
"""Resource ids are `ldmflow.dataset.<16 hex of the dataset URI's sha256>`: stable per dataset, and free of
the characters (`/`, `:`) a URI would bring into an id that triggers match on with `*` patterns."""


def dataset_resource(dataset: str) -> dict[str, str]:
    """The Prefect resource an event about `dataset` (a folder or s3:// prefix) concerns."""
    digest = hashlib.sha256(dataset.encode()).hexdigest()[:16]
    return {"prefect.resource.id": f"{RESOURCE_PREFIX}{digest}", "prefect.resource.name": dataset,
            "ldmflow.dataset": dataset}


def emit_new_items(dataset: str, source: str, new_items: int, *, details: dict[str, Any] | None = None,
                   flush: bool = False) -> Any:
    """Emit `ldmflow.dataset.new-items` for `dataset` when `new_items` > 0; returns the event, or None when
    there was nothing new (nothing emitted) or events are off (no Prefect API to send to).

    The payload carries `dataset`, `source` and `new_items` (the trigger passes the first two to `retrain`
    as parameters) plus `details`. `flush`: wait until the event has been sent, for callers outside a flow
    run (a flow run sends its events before it ends; a short script might exit first)."""
    if new_items < 0:
        raise ValueError(f"new_items must be >= 0, got {new_items}")
    if new_items == 0:
        return None
    from prefect.events import emit_event

    payload = {**(details or {}), "dataset": dataset, "source": source, "new_items": int(new_items)}
    event = emit_event(NEW_ITEMS_EVENT, resource=dataset_resource(dataset), payload=payload,
                       related=[{"prefect.resource.id": f"ldmflow.source.{hashlib.sha256(source.encode()).hexdigest()[:16]}",
                                 "prefect.resource.role": "source", "prefect.resource.name": source}])
    if flush and event is not None:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30)
    return event
