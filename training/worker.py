"""The training loop each Ray Train worker runs: one DeepSpeed rank over its split of the shards.

Read it top to bottom: build, restore, then per step load batch -> forward/backward -> step ->
log -> checkpoint. Each phase is a function below the loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from training.checkpointing import (
    COMMITTED,
    DEEPSPEED_DIR,
    UNET_FILE,
    CheckpointError,
    TrainState,
    load_deepspeed_checkpoint,
    load_ema,
    load_rank_files,
    mark_committed,
    model_differences,
    read_state,
    restore_rng,
    rng_state,
    save_ema,
    save_rank_files,
    save_unet_weights,
    write_file_list,
)
from training.config import RunConfig, TrainConfig, config_from_dict
from training.shard_loader import LoaderState, ShardStream, read_split
from training.tasks import build_task

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


def train_loop_per_worker(payload: dict) -> None:
    """Entry point Ray calls on every worker. `payload` is plain data: config, data path, run id."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_dict(payload["config"])
    train_ctx = ray.train.get_context()
    ctx = WorkerContext(train_ctx.get_world_rank(), train_ctx.get_world_size(), ray.train.torch.get_device())
    if ctx.device.type == "cpu":
        # DeepSpeed picks its accelerator once, on first use; without a GPU it must be told.
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(payload.get("storage_env", {}))
    torch.set_num_threads(cfg.train.cpus_per_worker)

    # --- build: the task (training/tasks.py) decides what is trained and its loss -----------
    task = build_task(cfg, seed=cfg.train.seed, device=ctx.device)
    frozen = check_frozen(task.frozen_hashes(), payload["frozen"])
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + ctx.rank)
    state = TrainState(world_size=ctx.world_size, config=cfg.to_dict(), frozen=frozen)
    loader_state = None

    # --- restore: Ray's latest checkpoint of this launch (after a worker failure), else the
    # checkpoint `ldmflow train --resume` chose; a different worker count goes through a universal
    # checkpoint, which the engine must be configured to load before it is built.
    with checkpoint_directory(payload, ctx) as directory:
        saved = read_state(directory, verify_hashes=True) if directory is not None else None
        elastic = saved is not None and saved.world_size != ctx.world_size
        engine = build_engine(task.module, cfg.train, ctx, load_universal=elastic)
        ema = build_ema(engine.module, cfg.train) if ctx.rank == 0 else None  # only rank 0 saves it
        if saved is not None:
            state, loader_state = restore(directory, saved, engine, ema, generator, ctx, frozen, cfg)
            log.info("rank %d resumed at step %d (written by %d workers, now %d)", ctx.rank, state.step,
                     saved.world_size, ctx.world_size)

    stream = ShardStream(payload["data"], rank=ctx.rank, world_size=ctx.world_size,
                         batch_size=cfg.train.batch_size, resolution=cfg.model.resolution, seed=cfg.train.seed,
                         state=loader_state, loader_workers=cfg.train.loader_workers,
                         shuffle_buffer=cfg.train.shuffle_buffer, pin_memory=ctx.device.type == "cuda",
                         holdout_fraction=cfg.validation.holdout_fraction)
    batches = iter(stream)
    metrics_log = make_metric_logger(payload, ctx)
    publish_worker_processes(metrics_log, ctx)
    logged_through = 0
    if saved is not None and metrics_log is not None:
        # Steps between the checkpoint and the failure may have reached MLflow already; the resumed
        # run recomputes them exactly, so they are not logged twice.
        logged_through = metrics_log.last_logged_step("loss")
        # A restart is part of the run's history: MLflow shows it beside the loss curve.
        metrics_log.log({"resumed_from_step": state.step}, step=state.step)
        metrics_log.flush()
    window = LossWindow()
    metrics: dict[str, float] = {}
    sample_log = SampleLog(payload.get("sample_log"), ctx.rank)
    validation = Validation(task, engine, ema, stream, cfg, ctx)

    # --- train -----------------------------------------------------------------------------
    while state.step < cfg.train.max_steps:
        started = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)  # load batch (decoded ahead by the loader's processes)
            sample_log.add(state.step + 1, batch.keys, batch.epochs)
            loss = task.loss(engine, batch, generator)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            window.add(float(loss.detach()), len(batch.captions))
        if ema is not None:
            ema.step(engine.module.parameters())
        state.step += 1
        state.samples_seen += cfg.train.batch_size * cfg.train.grad_accum * ctx.world_size
        window.end_step(time.perf_counter() - started)

        last = state.step == cfg.train.max_steps
        if state.step % cfg.train.log_every == 0 or last:
            metrics = window.reduce(ctx, engine, state, stream.state)
            if metrics_log is not None and state.step > logged_through:
                metrics_log.log(metrics, step=state.step)
            if ctx.rank == 0:
                log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s", state.step, cfg.train.max_steps,
                         metrics["loss"], metrics["lr"], metrics["samples_per_sec"])
            window = LossWindow()
        if validation.due(state.step, last):
            validation.run(state.step, metrics_log if state.step > logged_through else None)
            metrics.update(validation.metrics)
        if state.step % cfg.train.checkpoint_every == 0 or last:
            began = time.perf_counter()
            save_and_report(engine, ema, state, stream.state, generator, ctx, metrics, cfg.train, final=last,
                            weights_file=task.weights_file)
            if metrics_log is not None and state.step > logged_through:
                # The step's stall: saving, listing and (sync mode) uploading the checkpoint.
                metrics_log.log({"checkpoint_seconds": time.perf_counter() - began}, step=state.step)
                metrics_log.flush()

    batches.close()  # stops the loader processes
    sample_log.close()
    if metrics_log is not None and not metrics_log.flush():
        log.warning("%d metrics could not reach MLflow", len(metrics_log.pending))


@contextmanager
def checkpoint_directory(payload: dict, ctx: WorkerContext) -> Iterator[Path | None]:
    """The checkpoint this (re)start of the worker group resumes from, as a local directory
    (downloaded from S3), or None for a fresh run.

    Rank 0 picks the later of Ray's latest registered checkpoint and the latest verified one in the
    run's storage, and every rank takes its pick. The two differ when a checkpoint was fully
    uploaded but not yet registered when a worker or the driver died (Ray registers a checkpoint
    only after every rank's asynchronous upload finished and its controller next polled): resuming
    from it instead of the older one saves up to checkpoint_every steps."""
    import ray.train

    from training.run_storage import ray_storage

    choice = None
    if ctx.rank == 0:
        choice = _latest_checkpoint(ray.train.get_checkpoint(), payload.get("run_location"))
    if dist.is_initialized() and ctx.world_size > 1:
        picked = [choice]
        dist.broadcast_object_list(picked, src=0)
        choice = picked[0]
    if choice is None:
        yield None
        return
    path, filesystem = ray_storage(choice)
    with ray.train.Checkpoint(path, filesystem=filesystem).as_directory() as directory:
        yield Path(directory)


def _latest_checkpoint(registered, run_location: str | None) -> str | None:
    """URI of the later of Ray's registered checkpoint and the run's latest verified one."""
    from training.run_storage import checkpoint_uri, latest_verified_checkpoint

    candidates = []
    if registered is not None:
        candidates.append((_committed_step(registered), checkpoint_uri(registered)))
    if run_location:
        latest = latest_verified_checkpoint(run_location)
        if latest is not None:
            candidates.append((latest.step, latest.uri))
    if not candidates:
        return None
    step, uri = max(candidates, key=lambda c: c[0])  # max keeps the first (Ray's) on a tie
    log.info("resuming from the step-%d checkpoint %s", step, uri)
    return uri


def _committed_step(checkpoint) -> int:
    """The step in a checkpoint's COMMITTED marker, read through its filesystem; -1 if unreadable."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{COMMITTED}") as f:
            return int(json.loads(f.read())["step"])
    except Exception as e:  # missing or partial: never preferred, and verified again when loaded
        log.warning("checkpoint %s has no readable %s: %s", checkpoint.path, COMMITTED, e)
        return -1


class SampleLog:
    """With LDMFLOW_SAMPLE_LOG set on the driver (a folder every worker can write), each rank appends
    the keys of every batch it trains on to <folder>/rank-<r>-<pid>.jsonl, one line per micro-batch:
    an audit of which samples a run saw, and in what order, across restarts."""

    def __init__(self, folder: str | None, rank: int):
        self.file = None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(folder) / f"rank-{rank}-{os.getpid()}.jsonl", "a", buffering=1)
        self.rank = rank

    def add(self, step: int, keys: list[str], epochs: list[int]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "rank": self.rank, "keys": keys, "epochs": epochs}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# --- phases -------------------------------------------------------------------------------


def check_frozen(got: dict, expected: dict) -> dict:
    """Every worker must hold the exact VAE and text encoder the driver will export."""
    for name, digest in expected.items():
        if got.get(name) != digest:
            raise RuntimeError(
                f"{name} weights on this worker (sha256 {got.get(name, '?')[:12]}) differ from the driver's "
                f"({digest[:12]}): the worker loaded a different model; make the path identical on every node"
            )
    return got


def deepspeed_config(train: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        # The optimizer is torch's AdamW, handed to DeepSpeed: it runs the same on CPU and GPU and
        # needs no JIT-compiled op. ZeRO partitions its state like any other optimizer's.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(train: TrainConfig):
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        if train.lr_schedule == "cosine":
            progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_engine(unet: torch.nn.Module, train: TrainConfig, ctx: WorkerContext, *, load_universal: bool = False):
    """The DeepSpeed engine around `unet`; `load_universal` configures it to load a universal
    checkpoint (a resume on a different number of workers), which must be known before it is built."""
    import deepspeed

    unet.to(ctx.device)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                                  fused=ctx.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    config = deepspeed_config(train)
    if load_universal:
        from training.elastic import deepspeed_universal_config

        config = deepspeed_universal_config(config)
    engine, _, _, _ = deepspeed.initialize(model=unet, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    return engine


def build_ema(module: torch.nn.Module, train: TrainConfig):
    if not train.ema.enabled:
        return None
    from diffusers.training_utils import EMAModel

    # fp32 shadows even when the engine trains in bf16: a 0.999 decay moves weights by less than
    # bf16's resolution, so a bf16 average would barely change. foreach: the update runs as
    # multi-tensor ops over all parameters instead of a loop of small ops per parameter (torch falls
    # back to per-tensor kernels for the fp32 - bf16 difference when the engine trains in bf16).
    return EMAModel([p.detach().float() for p in module.parameters()], decay=train.ema.decay,
                    use_ema_warmup=False, foreach=True)


class Validation:
    """Validation on the held-out split (validation.holdout_fraction) every validation.every steps and
    at the final step: the task's validation metrics and, for the `ldm` task, a sample grid of
    tracking.sample_prompts, both logged to MLflow. With EMA, the EMA weights are scored (they are
    what is exported). Under ZeRO-3 every rank takes part (each forward gathers the parameters from
    all ranks); otherwise rank 0 alone, while the others wait at the next step's collective."""

    def __init__(self, task, engine, ema, stream: ShardStream, cfg: RunConfig, ctx: WorkerContext):
        self.task, self.engine, self.ema, self.cfg, self.ctx = task, engine, ema, cfg, ctx
        self.every = cfg.validation.every
        self.enabled = cfg.validation.holdout_fraction > 0
        self.partitioned = engine.zero_optimization_partition_weights()
        self.takes_part = self.enabled and (self.partitioned or ctx.rank == 0)
        self.held_out = None
        if self.takes_part:
            v = cfg.validation
            self.held_out = read_split(stream.dataset, v.holdout_fraction, cfg.model.resolution, v.max_samples)
        self.metrics: dict[str, float] = {}

    def due(self, step: int, last: bool) -> bool:
        return self.enabled and (last or (self.every > 0 and step % self.every == 0))

    def run(self, step: int, metrics_log) -> None:
        if not self.takes_part:
            return
        began = time.perf_counter()
        module = self.engine.module
        params = list(module.parameters())
        if self.ema is not None:
            self.ema.store(params)
            self.ema.copy_to(params)
        try:
            self.metrics = self.task.validate(module, self.held_out)
            grid = self.task.sample_grid(module)
        finally:
            if self.ema is not None:
                self.ema.restore(params)
        self.metrics["validation_seconds"] = time.perf_counter() - began
        if self.ctx.rank != 0:
            return
        log.info("step %d validation: %s", step, "  ".join(f"{k} {v:.4g}" for k, v in sorted(self.metrics.items())))
        if metrics_log is None:
            return
        metrics_log.log(self.metrics, step=step)
        if grid is not None:
            try:
                metrics_log.client.log_image(metrics_log.run_id, grid, artifact_file=f"samples/step-{step:06d}.png")
            except Exception as e:  # like the metrics: a tracking outage never stops training
                log.warning("could not log the step-%d sample grid: %s", step, e)


class LossWindow:
    """Loss and throughput since the last log line."""

    def __init__(self) -> None:
        self.loss_sum, self.count, self.samples, self.elapsed, self.steps = 0.0, 0, 0, 0.0, 0

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.count += 1
        self.samples += samples

    def end_step(self, seconds: float) -> None:
        self.elapsed += seconds
        self.steps += 1

    def reduce(self, ctx: WorkerContext, engine, state: TrainState, loader: LoaderState) -> dict[str, float]:
        # Mean loss over all ranks; throughput of the slowest rank (the step waits for it anyway).
        t = torch.tensor([self.loss_sum, self.count, self.samples], dtype=torch.float64)
        elapsed = torch.tensor([self.elapsed], dtype=torch.float64)
        if dist.is_initialized():
            t = t.to(ctx.device)
            elapsed = elapsed.to(ctx.device)
            dist.all_reduce(t)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        loss_sum, count, samples = t.tolist()
        return {
            "loss": loss_sum / max(count, 1),
            "lr": float(engine.get_lr()[0]),
            "samples_per_sec": samples / max(float(elapsed.item()), 1e-9),
            "step_seconds": float(elapsed.item()) / max(self.steps, 1),
            "epoch": float(loader.epoch),
            "samples_seen": float(state.samples_seen),
        }


def make_metric_logger(payload: dict, ctx: WorkerContext):
    if ctx.rank != 0 or not payload.get("mlflow_run_id"):
        return None
    from training.tracking import BufferedMetricLogger

    # A flush that waits out MLflow's default retries (minutes) would stall every rank at the next
    # collective; fail fast instead and keep the metrics buffered for the next flush.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return BufferedMetricLogger(payload["mlflow_run_id"], payload["tracking_uri"], flush_every=200)


def publish_worker_processes(metrics_log, ctx: WorkerContext) -> None:
    """Tag the MLflow run with the process behind each rank, `worker.rank<N>` = "<host> <pid>"
    (rewritten whenever the worker group restarts), so a rank's process can be found and signalled.
    Every rank must call it (it is a collective); only rank 0, which holds the logger, writes."""
    me = f"{socket.gethostname()} {os.getpid()}"
    processes = [me]
    if dist.is_initialized():
        processes = [""] * ctx.world_size
        dist.all_gather_object(processes, me)
    if metrics_log is None:
        return
    from mlflow.entities import RunTag

    try:
        metrics_log.client.log_batch(metrics_log.run_id, synchronous=True,
                                     tags=[RunTag(f"worker.rank{r}", p) for r, p in enumerate(processes)])
    except Exception as e:  # like the metrics: a tracking outage never stops training
        log.warning("could not tag the MLflow run with its worker processes: %s", e)


GATHER_CHUNK_BYTES = 256 << 20
"""ZeRO-3 export gathers parameters in groups of about this many bytes (full size, all ranks)."""


def gather_unet_weights(engine, ctx: WorkerContext) -> dict[str, torch.Tensor] | None:
    """The engine's full UNet state dict, on CPU, in the module's own (training) dtype; every rank
    must call it (under ZeRO-3 it is a series of collectives), only rank 0 gets the dict.

    Stages 0-2 keep the full module on every rank, so rank 0 just copies it. ZeRO-3 partitions each
    parameter across ranks: they are all-gathered a group at a time (GATHER_CHUNK_BYTES), copied to
    CPU on rank 0 and released, so no rank ever holds more than one group beyond its partition."""
    module = engine.module
    if not engine.zero_optimization_partition_weights():
        if ctx.rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    import deepspeed

    keys = list(module.state_dict().keys())  # parameters are placeholders here, names are right
    params = list(module.named_parameters())
    weights: dict[str, torch.Tensor] = {}
    group: list[tuple[str, torch.nn.Parameter]] = []
    size = 0

    def gather(group) -> None:
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            if ctx.rank == 0:
                for name, p in group:
                    weights[name] = p.detach().to("cpu", copy=True)

    for name, p in params:
        group.append((name, p))
        size += getattr(p, "ds_numel", p.numel()) * p.element_size()
        if size >= GATHER_CHUNK_BYTES:
            gather(group)
            group, size = [], 0
    if group:
        gather(group)
    if ctx.rank != 0:
        return None
    # Buffers are not partitioned; keep only persistent ones (those in the state dict).
    for name, b in module.named_buffers():
        if name in keys and name not in weights:
            weights[name] = b.detach().to("cpu", copy=True)
    missing = [k for k in keys if k not in weights]
    if missing:
        raise RuntimeError(f"gathered UNet weights miss {missing[:3]}")
    return {k: weights[k] for k in keys}


def save_and_report(engine, ema, state: TrainState, loader: LoaderState, generator: torch.Generator,
                    ctx: WorkerContext, metrics: dict, train: TrainConfig, *, final: bool = False,
                    weights_file: str = UNET_FILE) -> None:
    """Every rank saves its part into a local folder and lists it (files/rank-N.json); once every
    rank has listed, rank 0 marks the checkpoint COMMITTED with each list's digest. Ray then copies
    each rank's folder into one checkpoint in storage, rank by rank, and registers it once every rank
    has reported; readers verify the lists (see training.checkpointing), not the upload order.
    With train.checkpoint_upload=async, report returns once Ray has taken the folder: the upload
    runs beside the next steps and Ray deletes the local folder when it is done.

    The final checkpoint also holds `weights_file` (unet.safetensors or vae.safetensors): the trained
    module's full weights gathered by the workers (every rank takes part, rank 0 writes and lists
    it), so the export never consolidates optimizer shards."""
    import ray.train

    from training.elastic import UNIVERSAL_CLIENT_STATE

    local = Path(tempfile.mkdtemp(prefix=f"ldm-ckpt-{state.step}-r{ctx.rank}-"))
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
        digest = write_file_list(local, ctx.rank)
        file_lists = [digest]
        if dist.is_initialized():
            # Also the barrier: no rank's list is missing when rank 0 writes the marker.
            file_lists = [""] * ctx.world_size
            dist.all_gather_object(file_lists, digest)
        if ctx.rank == 0:
            mark_committed(local, state, file_lists)
        upload = ray.train.CheckpointUploadMode.ASYNC if train.checkpoint_upload == "async" else \
            ray.train.CheckpointUploadMode.SYNC
        ray.train.report({**metrics, "step": state.step}, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_upload_mode=upload, delete_local_checkpoint_after_upload=True)
        handed_over = True
    finally:
        if not handed_over:
            shutil.rmtree(local, ignore_errors=True)


def restore(directory: Path, saved: TrainState, engine, ema, generator: torch.Generator, ctx: WorkerContext,
            frozen: dict, cfg: RunConfig) -> tuple[TrainState, LoaderState]:
    """Load a verified checkpoint (`saved` is its read_state, hashes checked) into this rank.

    Written by as many workers as now: each rank loads its own DeepSpeed partition, loader position
    and RNG. Written by a different number: the DeepSpeed state goes through a universal checkpoint
    (converted by each rank into its own temp folder), the loader positions of all old ranks are
    re-split over the new ranks, and the RNG is re-seeded from (seed, step, rank): the data and the
    optimizer continue exactly, the noise draws cannot (they depended on the old rank layout)."""
    if saved.frozen != frozen:
        raise CheckpointError(f"checkpoint {directory} was trained against different frozen weights")
    _check_same_model(directory, saved, cfg)
    state = TrainState(step=saved.step, samples_seen=saved.samples_seen, world_size=ctx.world_size,
                       config=cfg.to_dict(), frozen=frozen)
    if ema is not None:
        load_ema(directory, ema, ctx.device)
    # Every old rank's position: unchanged for this rank when the layout (workers x loader workers)
    # is the same, re-split over the new streams when it is not.
    positions = [load_rank_files(directory, r)[0] for r in range(saved.world_size)]
    loader = LoaderState.resplit(positions, world_size=ctx.world_size, rank=ctx.rank,
                                 loader_workers=cfg.train.loader_workers)
    if saved.world_size == ctx.world_size:
        load_deepspeed_checkpoint(engine, directory, saved.tag)
        restore_rng(load_rank_files(directory, ctx.rank)[1], generator)
        return state, loader

    from training.elastic import convert_to_universal, load_universal_checkpoint

    with tempfile.TemporaryDirectory(prefix=f"ldm-universal-r{ctx.rank}-") as tmp:
        tag = convert_to_universal(directory / DEEPSPEED_DIR, saved.tag, Path(tmp))
        load_universal_checkpoint(engine, Path(tmp), tag)
    generator.manual_seed(cfg.train.seed * 1000 + saved.step * 7919 + ctx.rank)
    return state, loader


def _check_same_model(directory: Path, saved: TrainState, cfg: RunConfig) -> None:
    """A checkpoint of another model (other UNet shape, latent size, text width) fails here with the
    keys that differ, not deep inside DeepSpeed with a tensor size mismatch."""
    differ = model_differences(saved, cfg.to_dict()["model"])
    if differ:
        raise CheckpointError(f"checkpoint {directory} is of a different model ({', '.join(differ)} differ); "
                              "resume it with its own config or start a new run")
