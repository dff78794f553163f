"""The new-data sensor: does a source hold items a dataset does not? If so, say so with an event.

`watch_source_flow` runs on a schedule (the `watch-source` deployment in prefect.yaml). It reads and
hashes the source's images and looks each sha256 up in the dataset's digest files (data_prep.known),
the same identity by content the shard step uses, so renamed or re-uploaded files are not "new". It
writes no shards: when items are new it emits `ldmflow.dataset.new-items` (pipelines/events.py), and
the `retrain` deployment's trigger starts the retrain that shards and trains on them. A run that finds
nothing new emits nothing, so nothing is retrained.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from prefect import flow, get_run_logger

from data_prep import storage
from data_prep.errors import DataPrepError
from pipelines.events import emit_new_items


@dataclass(frozen=True)
class NewItems:
    source: str
    dataset: str
    items: int
    """Usable items the source lists (an image with a caption)."""
    new: int
    """Of those, how many the dataset does not hold by content."""
    dataset_samples: int
    """Samples in the dataset now (0 when there is no dataset yet)."""


def count_new_items(source: str, dataset: str) -> NewItems:
    """Items of `source` (a folder with captions, or a table of paths; local or s3://) whose bytes are not in
    `dataset`. Every item is read and hashed, as the shard step would; nothing is decoded or written (but a
    part from before digest files existed gets its digest file, which is derived data)."""
    from data_prep.dataset import read_dataset, read_index
    from data_prep.known import KnownDigests, digest_files
    from data_prep.sources import SourceOptions, plan_source

    plan = plan_source(source, SourceOptions())
    if plan.shards:
        raise DataPrepError(f"{source} is a set of shards; the sensor watches image folders and tables of paths")
    remote = [ref.source_id for ref in plan.items if ref.image.startswith(("http://", "https://"))]
    if remote:
        raise DataPrepError(f"{source} lists URLs ({remote[0]}, ...); the sensor reads folders and tables of "
                            "local or s3:// paths only: schedule `retrain` itself for URL tables")
    if read_index(dataset) is None:
        known, samples = KnownDigests(), 0
    else:
        existing = read_dataset(dataset)
        known, samples = digest_files(existing.parts), existing.total_samples
    digests = {hashlib.sha256(storage.storage_for(ref.image).read_bytes(ref.image)).hexdigest() for ref in plan.items}
    new = sum(1 for d in digests if d not in known)
    return NewItems(source=source, dataset=dataset, items=len(plan.items), new=new, dataset_samples=samples)


@flow(name="ldm-watch-source", log_prints=True)
def watch_source_flow(source: str, dataset: str) -> dict:
    """Emit `ldmflow.dataset.new-items` when `source` holds items `dataset` does not (by content)."""
    found = count_new_items(storage.absolute(source), storage.absolute(dataset))
    event = emit_new_items(found.dataset, found.source, found.new,
                           details={"items": found.items, "dataset_samples": found.dataset_samples})
    get_run_logger().info("%s: %d of %d items are not in %s%s", found.source, found.new, found.items,
                          found.dataset, "; emitted ldmflow.dataset.new-items" if event is not None else "")
    return {**asdict(found), "event_id": str(event.id) if event is not None else None}
