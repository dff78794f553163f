"""Which checkpoint a (re)started worker group resumes from, and each rank's verified copy of it.

Rank 0 lists the candidates: every committed checkpoint of the run that its listing vouches for
(sizes), and Ray's latest registered one, newest first. Ray registers a checkpoint only after every
rank's asynchronous upload finished and its controller next polled, so the newest in storage may be
later than Ray's: resuming from it saves up to checkpoint_every steps. For each candidate in turn
every rank fetches what it loads (see `rank_files`: its own partition and the shared files, not
every rank's), checks their sha256, and the group takes the first candidate that verifies on every
rank. One that fails is skipped with the rank and the reason in the log, so a corrupt newest
checkpoint costs the steps since the one before it, never the run.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch.distributed as dist

from training.checkpoint.layout import (
    COMMITTED,
    DEEPSPEED_DIR,
    EMA_FILE,
    FILES_DIR,
    STATE_FILE,
    UNET_FILE,
    VAE_FILE,
    CheckpointError,
    TrainState,
)
from data_prep.storage import s3_bytes_read
from training.checkpoint.elastic import universal_files_loaded
from training.checkpoint.run_storage import checkpoint_uri, download_checkpoint
from training.checkpoint.universal_store import (
    fetch_conversion,
    publish_conversion,
    stored_conversion,
    wait_for_conversion,
)
from training.checkpoint.verify import listed_files, read_state, verified_checkpoints
from training.runtime.context import WorkerContext, WorkerPayload

log = logging.getLogger(__name__)

class Restore(NamedTuple):
    """A verified local copy of a checkpoint (what this rank loads), its state, and where it is stored."""

    directory: Path
    saved: TrainState
    uri: str


def small_file(rel: str) -> bool:
    """The marker, the state, every rank's file list and loader position: what every rank reads."""
    return rel in (COMMITTED, STATE_FILE) or rel.startswith((f"{FILES_DIR}/", "loader/"))


def rank_files(saved: TrainState, listed: list[dict], rank: int, world_size: int, *,
               convert: bool = False) -> Callable[[str], bool]:
    """Which files of a checkpoint rank `rank` of a group of `world_size` loads. On as many workers as
    wrote it: the small files, the files its own rank listed (its ZeRO partition and RNG; rank 0's also
    the EMA) and DeepSpeed's shared module file. On another number of workers: the small files and
    (rank 0) the EMA; the DeepSpeed state comes from the stored universal conversion
    (universal_copy), and only the rank that makes it (`convert`) reads every rank's partitions.
    Never the final gathered weights, which only the export reads."""
    export_only = (UNET_FILE, VAE_FILE)
    if saved.world_size != world_size:
        partitions = f"{DEEPSPEED_DIR}/{saved.tag}/"
        return lambda rel: small_file(rel) or (rank == 0 and rel == EMA_FILE) or (convert and rel.startswith(partitions))
    own = set(listed[rank]) - set(export_only)
    shared = f"{DEEPSPEED_DIR}/{saved.tag}/mp_rank_00_model_states.pt"  # ZeRO 0-2's module file, every rank's
    return lambda rel: small_file(rel) or rel == shared or rel in own


def fetch_verified(uri: str, local_dir: Path, ctx: WorkerContext) -> Restore:
    """This rank's part of the checkpoint at `uri` as a local folder (S3: downloaded into `local_dir`;
    local storage: in place), its sha256 checked; CheckpointError when it does not verify."""
    local = download_checkpoint(uri, local_dir, only=small_file)
    saved = read_state(local, only=lambda rel: False)  # the marker, the state and the lists
    convert = saved.world_size != ctx.world_size and ctx.rank == 0 and stored_conversion(uri) is None
    needed = rank_files(saved, [listed_files(local, r) for r in range(saved.world_size)], ctx.rank,
                        ctx.world_size, convert=convert)
    local = download_checkpoint(uri, local_dir, only=lambda rel: needed(rel) and not small_file(rel))
    return Restore(local, read_state(local, verify_hashes=True, only=needed), uri)


def universal_copy(restore_point: Restore, engine, ctx: WorkerContext, scratch: Path) -> tuple[Path, str]:
    """(folder, tag) of this rank's copy of the universal conversion of `restore_point`, for an engine
    built to load one. The group's rank 0 makes it once and stores it in the checkpoint (or finds it
    stored by an earlier resume); the other ranks wait for it; each fetches only what `engine` loads."""
    attempt = _from_rank0(secrets.token_hex(8) if ctx.rank == 0 else None, ctx)
    conversion = stored_conversion(restore_point.uri) if ctx.rank == 0 else None
    if ctx.rank == 0 and conversion is None:
        conversion = publish_conversion(restore_point.uri, restore_point.directory / DEEPSPEED_DIR,
                                        restore_point.saved.tag, scratch / "convert", attempt)
        return scratch / "convert", conversion.tag  # what it just made and stored: nothing to fetch back
    if conversion is None:
        conversion = wait_for_conversion(restore_point.uri, attempt, ctx.rank)
    return fetch_conversion(conversion, scratch / "fetched", universal_files_loaded(engine)), conversion.tag


@contextmanager
def checkpoint_directory(payload: WorkerPayload, ctx: WorkerContext) -> Iterator[Restore | None]:
    """The checkpoint this (re)start of the worker group resumes from, verified on every rank, or
    None for a fresh run; CheckpointError when the run has checkpoints but none verifies."""
    import ray.train

    together = dist.is_initialized() and ctx.world_size > 1
    candidates = None
    if ctx.rank == 0 or not together:
        candidates = _candidates(ray.train.get_checkpoint(), payload.run_location)
    candidates = _from_rank0(candidates, ctx)
    began = s3_bytes_read()
    for step, uri in candidates:
        with tempfile.TemporaryDirectory(prefix=f"ldm-restore-r{ctx.rank}-") as tmp:
            restore, problem = None, ""
            try:
                restore = fetch_verified(uri, Path(tmp), ctx)
            except CheckpointError as e:
                problem = str(e)
            problems = _gather(problem, ctx)
            if not any(problems):
                log.info("rank %d resumes from the step-%d checkpoint %s", ctx.rank, step, uri)
                yield restore
                # What a restore costs on S3 (0 on local storage); the universal fetch included.
                log.info("rank %d read %.1f MB from storage for its restore", ctx.rank, (s3_bytes_read() - began) / 1e6)
                return
            for rank, reason in enumerate(problems):
                if reason and ctx.rank == 0:
                    log.warning("skipping the step-%d checkpoint %s: on rank %d, %s", step, uri, rank, reason)
    if candidates:
        raise CheckpointError(f"none of the {len(candidates)} checkpoints of {payload.run_location} verifies on "
                              "every rank (see the warnings above); restore one or start a new run")
    yield None


def _candidates(registered, run_location: str) -> list[tuple[int, str]]:
    """(step, URI) of every checkpoint the run's listing vouches for, and Ray's registered one,
    newest first (Ray's first on a tie)."""
    found: list[tuple[int, str]] = []
    if registered is not None:
        found.append((_committed_step(registered), checkpoint_uri(registered)))
    seen = {uri for _, uri in found}
    found.extend((ref.step, ref.uri) for ref in verified_checkpoints(run_location) if ref.uri not in seen)
    return sorted(found, key=lambda c: -c[0])  # stable: Ray's stays first among equal steps


def _committed_step(checkpoint) -> int:
    """The step in a checkpoint's COMMITTED marker, read through its filesystem; -1 if unreadable."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{COMMITTED}") as f:
            return int(json.loads(f.read())["step"])
    except Exception as e:  # missing or partial: never preferred, and verified again when loaded
        log.warning("checkpoint %s has no readable %s: %s", checkpoint.path, COMMITTED, e)
        return -1


def _from_rank0(value, ctx: WorkerContext):
    if dist.is_initialized() and ctx.world_size > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _gather(value: str, ctx: WorkerContext) -> list[str]:
    if dist.is_initialized() and ctx.world_size > 1:
        out = [""] * ctx.world_size
        dist.all_gather_object(out, value)
        return out
    return [value]
