"""The loop's checkpoint phase: every rank saves and reports its part; on a (re)start the checkpoint
to resume from is picked, verified and restored into the engine, the EMA, the loader and the RNG.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from training.checkpoint.elastic import UNIVERSAL_CLIENT_STATE, load_universal_checkpoint
from training.checkpoint.layout import DEEPSPEED_DIR, UNET_FILE, CheckpointError, TrainState
from training.checkpoint.loading import (
    load_deepspeed_checkpoint,
    load_ema,
    load_positions,
    load_rank_files,
    model_differences,
    restore_rng,
)
from training.checkpoint.writer import rng_state, save_ema, save_rank_files, save_unet_weights
from training.config import RunConfig, TrainConfig
from training.loader.plan import LoaderState, restart_at_next_epoch
from training.runtime.checkpoint_commit import CommittingUpload
from training.runtime.context import WorkerContext, WorkerPayload
from training.runtime.engine import gather_unet_weights
from training.runtime.restore_point import Restore, universal_copy

log = logging.getLogger(__name__)


def check_frozen(got: dict, expected: dict) -> dict:
    """Every worker must hold the exact VAE and text encoder the driver will export."""
    for name, digest in expected.items():
        if got.get(name) != digest:
            raise RuntimeError(
                f"{name} weights on this worker (sha256 {got.get(name, '?')[:12]}) differ from the driver's "
                f"({digest[:12]}): the worker loaded a different model; make the path identical on every node"
            )
    return got


def save_and_report(engine, ema, state: TrainState, loader: LoaderState, generator: torch.Generator,
                    ctx: WorkerContext, metrics: dict, train: TrainConfig, *, final: bool = False,
                    weights_file: str = UNET_FILE) -> None:
    """Every rank saves its part into a local folder and hands it to ``ray.train.report``; Ray's
    upload (with a training.runtime.checkpoint_commit.CommittingUpload) hashes and lists each rank's
    files (files/rank-N.json), copies the folder into the checkpoint's storage directory, and there
    rank 0 writes COMMITTED, with each list's digest, once every rank's files are in. Ray registers
    the checkpoint once every rank has reported; readers verify the lists (training.checkpoint.verify).
    With train.checkpoint_upload=async, report returns once Ray has taken the folder: hashing and
    upload run beside the next steps and Ray deletes the local folder when it is done.

    The final checkpoint also holds `weights_file` (unet.safetensors or vae.safetensors): the trained
    module's full weights gathered by the workers (every rank takes part, rank 0 writes and lists
    it), so the export never consolidates optimizer shards."""
    import ray.train

    if train.checkpoint_upload == "async":
        wait_for_uploads(ctx.rank, train.max_pending_uploads)
    local = Path(tempfile.mkdtemp(prefix=f"{LOCAL_PREFIX}{state.step}-r{ctx.rank}-p{os.getpid()}-"))
    handed_over = False
    try:
        state.tag = f"step-{state.step:08d}"
        # The universal-checkpoint entry lets a different number of workers resume from it.
        engine.save_checkpoint(str(local / DEEPSPEED_DIR), tag=state.tag, client_state=UNIVERSAL_CLIENT_STATE)
        save_rank_files(local, ctx.rank, loader=loader.to_dict(), rng=rng_state(generator))
        if ctx.rank == 0 and ema is not None:
            save_ema(local, ema)
        if final:
            weights = gather_unet_weights(engine, ctx)  # a collective under ZeRO-3: every rank
            if ctx.rank == 0:
                save_unet_weights(local, weights, step=state.step, name=weights_file)
            del weights
        # Hashing every file (seconds for large states) and the COMMITTED marker happen in Ray's
        # upload thread (training.runtime.checkpoint_commit), not while every rank waits here.
        upload_fn = CommittingUpload(ctx.rank, ctx.world_size, replace(state))  # the state as of this step
        upload = ray.train.CheckpointUploadMode.ASYNC if train.checkpoint_upload == "async" else \
            ray.train.CheckpointUploadMode.SYNC
        ray.train.report({**metrics, "step": state.step}, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_upload_mode=upload, delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_fn=upload_fn)
        handed_over = True
    finally:
        if not handed_over:
            shutil.rmtree(local, ignore_errors=True)


LOCAL_PREFIX = "ldm-ckpt-"
"""Each rank's local checkpoint folder (in the temp dir) is ldm-ckpt-<step>-r<rank>-p<pid>-<random>:
Ray uploads it and then deletes it."""
UPLOAD_WAIT_S = 1800.0
"""How long a checkpoint waits for earlier uploads before the run fails (storage unreachable)."""


def pending_uploads(rank: int, pid: int | None = None) -> list[Path]:
    """This process's (or `pid`'s) local checkpoint folders of `rank` that Ray has not uploaded yet."""
    mark = f"-r{rank}-p{pid or os.getpid()}-"
    return sorted(p for p in Path(tempfile.gettempdir()).glob(f"{LOCAL_PREFIX}*") if mark in p.name and p.is_dir())


def wait_for_uploads(rank: int, limit: int, *, timeout_s: float = UPLOAD_WAIT_S, poll_s: float = 0.5) -> float:
    """Block while `limit` or more of this rank's checkpoints are still uploading (storage slower than
    train.checkpoint_every: without a bound they pile up on local disk); returns the seconds waited."""
    if len(pending_uploads(rank)) < limit:
        return 0.0
    log.warning("rank %d: %d checkpoints are still uploading (train.max_pending_uploads=%d): storage is slower than "
                "train.checkpoint_every; the next checkpoint waits for one", rank, len(pending_uploads(rank)), limit)
    began = time.monotonic()
    while len(pending_uploads(rank)) >= limit:
        if time.monotonic() - began > timeout_s:
            raise RuntimeError(f"rank {rank}: earlier checkpoints have not finished uploading after {timeout_s:.0f} s; "
                               "is the storage reachable?")
        time.sleep(poll_s)
    waited = time.monotonic() - began
    log.info("rank %d waited %.1f s for earlier checkpoint uploads", rank, waited)
    return waited


def remove_orphaned_uploads() -> int:
    """Remove the local checkpoint folders of processes that no longer run (a killed worker's never
    upload); returns how many. Folders of live processes, another run's too, are left alone."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{LOCAL_PREFIX}*"):
        match = re.search(r"-p(\d+)-", path.name)
        if match is None or not path.is_dir() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d local checkpoint folders of dead workers", removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def restore(restore_point: Restore, engine, ema, generator: torch.Generator, ctx: WorkerContext,
            frozen: dict, payload: WorkerPayload) -> tuple[TrainState, LoaderState]:
    """Load a verified checkpoint (restore_point.saved is its read_state, hashes checked) into this rank.

    Written by as many workers as now: each rank loads its own DeepSpeed partition, loader position
    and RNG. Written by a different number: the DeepSpeed state goes through a universal checkpoint
    (converted once by rank 0 and stored in the checkpoint; each rank fetches what it loads), the
    loader positions of all old ranks are re-split over the new ranks, and the RNG is re-seeded from
    (seed, step, rank): the data and the optimizer continue exactly, the noise draws cannot (they
    depended on the old rank layout)."""
    directory, saved, _ = restore_point
    cfg = payload.config
    if saved.frozen != frozen:
        raise CheckpointError(f"checkpoint {directory} was trained against different frozen weights")
    _check_same_model(directory, saved, cfg)
    state = TrainState(step=saved.step, samples_seen=saved.samples_seen, world_size=ctx.world_size,
                       config=cfg.to_dict(), frozen=frozen, dataset_content_id=payload.dataset_content_id)
    if ema is not None:
        load_ema(directory, ema, ctx.device)
    loader = loader_position(load_positions(directory, saved.world_size), saved, ctx,
                             payload)
    if saved.world_size == ctx.world_size:
        load_deepspeed_checkpoint(engine, directory, saved.tag)
        restore_rng(load_rank_files(directory, ctx.rank)[1], generator)
        return state, loader

    with tempfile.TemporaryDirectory(prefix=f"ldm-universal-r{ctx.rank}-") as tmp:
        folder, tag = universal_copy(restore_point, engine, ctx, Path(tmp))
        load_universal_checkpoint(engine, folder, tag)
    generator.manual_seed(cfg.train.seed * 1000 + saved.step * 7919 + ctx.rank)
    return state, loader


def loader_position(positions: list[dict], saved: TrainState, ctx: WorkerContext,
                    payload: WorkerPayload) -> LoaderState:
    """This rank's loader state from every old rank's saved `positions`: unchanged for this rank when
    the layout (workers x loader workers) is the same, re-split over the new streams when it is not;
    on data that changed since (another content id), the next epoch from its start when the run
    allows new data, else refused (saved byte offsets would point into other tars)."""
    workers = payload.config.train.loader_workers
    if saved.dataset_content_id not in ("", payload.dataset_content_id):
        if not payload.allow_new_data:
            raise CheckpointError(f"the checkpoint's loader positions point into dataset "
                                  f"{saved.dataset_content_id[:12]}, but {payload.data} is now "
                                  f"{payload.dataset_content_id[:12]}; resume with --allow-new-data to continue "
                                  "on it from the next epoch")
        return restart_at_next_epoch(positions, world_size=ctx.world_size, rank=ctx.rank, loader_workers=workers)
    if payload.allow_new_data and not saved.dataset_content_id:
        # Written before checkpoints recorded their data; the driver saw the data change.
        return restart_at_next_epoch(positions, world_size=ctx.world_size, rank=ctx.rank, loader_workers=workers)
    return LoaderState.resplit(positions, world_size=ctx.world_size, rank=ctx.rank, loader_workers=workers)


def _check_same_model(directory: Path, saved: TrainState, cfg: RunConfig) -> None:
    """A checkpoint of another model (other UNet shape, latent size, text width) fails here with the
    keys that differ, not deep inside DeepSpeed with a tensor size mismatch."""
    differ = model_differences(saved, cfg.to_dict()["model"])
    if differ:
        raise CheckpointError(f"checkpoint {directory} is of a different model ({', '.join(differ)} differ); "
                              "resume it with its own config or start a new run")
