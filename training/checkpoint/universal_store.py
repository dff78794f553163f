"""A checkpoint's universal conversion, made once and kept in storage inside the checkpoint.

Resuming on another number of workers goes through DeepSpeed's universal checkpoint
(training.checkpoint.elastic). Converting reads every rank's partitions and costs minutes for a large
model, so it runs once per checkpoint, on one rank (the group's rank 0), and is stored beside the
state it was made from::

    universal/<tag>_universal/...   what convert_to_universal made (zero/<param>/*.pt, zero/optimizer_state.pt,
                                    the model-states file)
    universal/COMMITTED             JSON, written last: the tag, the sha256 of the checkpoint's own COMMITTED
                                    (the source) and every file above with its size and sha256
    universal/FAILED                JSON: the attempt that failed and why, so the waiting ranks stop at once

Like the checkpoint itself, a conversion is trusted only when its marker is there, names this
checkpoint's marker and every listed file is present with its listed size; each rank then checks the
sha256 of what it fetches. A conversion killed midway has no marker, and the next attempt removes it
and converts again: a partial one is never taken for complete. The universal format fits every
worker count, so a later resume on this or any other count reuses it; Ray's num_to_keep deletes it
with its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data_prep import storage
from training.checkpoint.elastic import convert_to_universal
from training.checkpoint.layout import COMMITTED, UNIVERSAL_DIR, CheckpointError, sha256_file
from training.checkpoint.run_storage import download_checkpoint

log = logging.getLogger(__name__)

FORMAT = 1
FAILED = "FAILED"
WAIT_S = 3600.0
"""How long a rank waits for rank 0's conversion: sd15's (860M parameters) takes minutes, not an hour."""


@dataclass(frozen=True)
class Conversion:
    """A complete universal conversion stored in a checkpoint."""

    uri: str
    """The checkpoint's universal/ folder (local path or s3:// URI)."""
    tag: str
    """The universal tag (<tag>_universal) for load_universal_checkpoint."""
    files: dict
    """Every file under universal/ (relative POSIX path, starting with the tag) -> {size, sha256}."""


def source_digest(checkpoint: str) -> str:
    """The sha256 of the checkpoint's COMMITTED marker: what a stored conversion must have been made from."""
    return hashlib.sha256(storage.storage_for(checkpoint).read_bytes(storage.join(checkpoint, COMMITTED))).hexdigest()


def stored_conversion(checkpoint: str) -> Conversion | None:
    """The complete conversion stored in the checkpoint at `checkpoint`, or None (none, partial, stale)."""
    uri = storage.join(checkpoint, UNIVERSAL_DIR)
    store = storage.storage_for(uri)
    present = {obj.name: obj.size for obj in store.list(uri)}
    if COMMITTED not in present:
        return None
    try:
        marker = json.loads(store.read_bytes(storage.join(uri, COMMITTED)))
        tag, files, source = str(marker["tag"]), dict(marker["files"]), marker["source"]
    except (ValueError, KeyError, TypeError, storage.NoSuchObjectError) as e:
        log.warning("%s/%s is unreadable (%s): converting again", uri, COMMITTED, e)
        return None
    if source != source_digest(checkpoint):
        log.warning("the conversion in %s was made from another state of the checkpoint: converting again", uri)
        return None
    for rel, meta in files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or parts[0] != tag:
            raise CheckpointError(f"{uri}/{COMMITTED} lists a path outside its tag: {rel!r}")
        if present.get(rel) != meta["size"]:
            log.warning("%s/%s is missing or has another size than listed: converting again", uri, rel)
            return None
    return Conversion(uri=uri, tag=tag, files=files)


def publish_conversion(checkpoint: str, deepspeed_dir: Path, tag: str, scratch: Path, attempt: str) -> Conversion:
    """Convert ``deepspeed_dir/tag`` (every rank's partitions, verified) in `scratch` and publish it
    into the checkpoint at `checkpoint`, its marker last; on failure, universal/FAILED names `attempt`
    and the reason for the ranks waiting in wait_for_conversion."""
    uri = storage.join(checkpoint, UNIVERSAL_DIR)
    store = storage.storage_for(uri)
    store.delete_prefix(uri)  # a conversion interrupted earlier, or a stale one
    try:
        source = source_digest(checkpoint)
        universal_tag = convert_to_universal(deepspeed_dir, tag, scratch)
        files = {}
        for path in sorted(p for p in (scratch / universal_tag).rglob("*") if p.is_file()):
            rel = f"{universal_tag}/{path.relative_to(scratch / universal_tag).as_posix()}"
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            store.put_file(str(path), storage.join(uri, rel))
        marker = {"format": FORMAT, "tag": universal_tag, "source": source, "files": files}
        store.put_bytes(storage.join(uri, COMMITTED), json.dumps(marker, indent=1, sort_keys=True).encode())
    except Exception as e:
        store.put_bytes(storage.join(uri, FAILED), json.dumps({"attempt": attempt, "error": str(e)}).encode())
        raise
    size = sum(meta["size"] for meta in files.values())
    log.info("stored the universal conversion of %s (%d files, %.1f MB)", checkpoint, len(files), size / 1e6)
    return Conversion(uri=uri, tag=universal_tag, files=files)


def wait_for_conversion(checkpoint: str, attempt: str, rank: int, *, timeout_s: float = WAIT_S,
                        poll_s: float = 1.0) -> Conversion:
    """The conversion rank 0 is making for this `attempt`, once complete; CheckpointError at once when
    rank 0 reports a failure, or after `timeout_s`."""
    began = time.monotonic()
    failed = storage.join(checkpoint, UNIVERSAL_DIR, FAILED)
    store = storage.storage_for(failed)
    while (conversion := stored_conversion(checkpoint)) is None:
        try:
            failure = json.loads(store.read_bytes(failed))
        except (storage.NoSuchObjectError, ValueError):
            failure = {}
        if failure.get("attempt") == attempt:
            raise CheckpointError(f"rank 0 could not convert {checkpoint} into a universal checkpoint: {failure['error']}")
        if time.monotonic() - began > timeout_s:
            raise CheckpointError(
                f"rank {rank} waited {timeout_s:.0f} s for rank 0 to convert {checkpoint} into a universal checkpoint "
                "(to resume on another number of workers) and it is not complete: see rank 0's log; a model this "
                "large may need a longer training.checkpoint.universal_store.WAIT_S")
        time.sleep(poll_s)
    return conversion


def fetch_conversion(conversion: Conversion, local_dir: Path, needed: Callable[[str], bool]) -> Path:
    """The folder holding ``conversion.tag`` with the files `needed` accepts (paths inside the tag,
    e.g. "zero/optimizer_state.pt"): from S3 downloaded into `local_dir`, local storage in place; their
    sha256 checked. Returns the folder to hand to load_universal_checkpoint."""
    prefix = f"{conversion.tag}/"
    wanted = {rel for rel in conversion.files if needed(rel[len(prefix):])}
    local = download_checkpoint(conversion.uri, local_dir, only=wanted.__contains__)
    for rel in sorted(wanted):
        if sha256_file(local / rel) != conversion.files[rel]["sha256"]:
            raise CheckpointError(f"{conversion.uri}/{rel} does not match the sha256 in its {COMMITTED}: corrupt")
    return local
