"""The training loop each Ray Train worker runs: one DeepSpeed rank over its split of the shards.

Read it top to bottom: `Trainer.build` makes the task, restores a checkpoint if there is one and
opens the data stream; `Trainer.train` is the loop, each step in four named phases:

    train_step        load batch -> forward/backward -> optimizer step (per micro-batch), EMA
    log_step          every train.log_every steps: the loss and throughput of all ranks
    maybe_validate    every validation.every steps: held-out metrics and a sample grid
    maybe_checkpoint  every train.checkpoint_every steps and at the end: save, list, commit, report

and after each step, asks whether the driver was told to stop (training.runtime.stopping): then the
step is checkpointed and the loop returns.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from training.checkpoint.layout import TrainState
from training.config import TrainConfig
from training.loader.plan import LoaderState
from training.loader.stream import ShardStream
from training.mlops.tracking import DEEPSPEED_CONFIG_ARTIFACT
from training.runtime.checkpointing import check_frozen, remove_orphaned_uploads, restore, save_and_report
from training.runtime.context import WorkerContext, WorkerPayload
from training.runtime.engine import build_ema, build_engine, micro_batches, module_init
from training.runtime.metrics import LossWindow, SampleLog, StepLogger, publish_worker_processes
from training.runtime.preflight import worker_preflight
from training.runtime.restore_point import checkpoint_directory
from training.runtime.stopping import StopWatch
from training.runtime.validation import Validation
from training.tasks import build_task
from training.tasks.base import Task

log = logging.getLogger(__name__)


def worker_entry(payload: WorkerPayload) -> Callable[[], None]:
    """The function Ray Train runs on every worker: the loop bound to the driver's payload."""
    return functools.partial(train_loop_per_worker, payload)


def train_loop_per_worker(payload: WorkerPayload) -> None:
    """Build, train to train.max_steps, close: what every rank runs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = WorkerContext.from_ray()
    if ctx.device.type == "cpu":
        # DeepSpeed picks its accelerator once, on first use; without a GPU it must be told.
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(payload.storage_env)
    worker_preflight(payload, ctx)  # this node's own access, in seconds, before anything is built
    torch.set_num_threads(payload.config.train.cpus_per_worker)
    trainer = Trainer.build(payload, ctx)
    try:
        trainer.train()
    finally:
        trainer.close()


def global_batch(train: TrainConfig, saved: TrainState | None) -> int:
    """The samples per step the run trains with: what its checkpoint recorded (or, for one written
    before it was recorded, what its config and worker count gave), else what the config asks for."""
    if saved is None:
        return train.batch_size * train.grad_accum * train.num_workers
    if saved.global_batch:
        return saved.global_batch
    then = saved.config.get("train", {})
    return int(then.get("batch_size", train.batch_size)) * int(then.get("grad_accum", train.grad_accum)) \
        * saved.world_size


class Trainer:
    """One rank's training state and the loop's phases over it."""

    def __init__(self, *, payload: WorkerPayload, ctx: WorkerContext, task: Task, engine, ema, state: TrainState,
                 stream: ShardStream, generator: torch.Generator, steps: StepLogger):
        self.cfg = payload.config
        self.train_config = self.cfg.train
        """cfg.train with the accumulation this worker count uses (Trainer.build, train.elastic_batch)."""
        self.ctx, self.task, self.engine, self.ema, self.state = ctx, task, engine, ema, state
        self.stream, self.generator, self.steps = stream, generator, steps
        self.batches = iter(stream)
        self.window = LossWindow()
        self.metrics: dict[str, float] = {}
        self.sample_log = SampleLog(payload.sample_log, ctx.rank)
        self.validation = Validation(task, engine, ema, stream, self.cfg, ctx)
        self.stop = StopWatch(payload.stop_board)

    # --- build --------------------------------------------------------------------------------

    @classmethod
    def build(cls, payload: WorkerPayload, ctx: WorkerContext) -> Trainer:
        """The task (training.tasks decides what is trained and its loss), the engine, and the state
        restored from the checkpoint this (re)start resumes from: Ray's latest checkpoint of this
        launch (after a worker failure), else the one `ldmflow train --resume` continues. A different
        worker count goes through a universal checkpoint, which the engine must be configured to
        load before it is built."""
        cfg = payload.config
        remove_orphaned_uploads()  # what killed workers of this node left behind
        # Under train.deepspeed.zero_init the trained module is partitioned as it is built (module_init).
        task = build_task(cfg, seed=cfg.train.seed, device=ctx.device, module_init=module_init(cfg.train))
        frozen = check_frozen(task.frozen_hashes(), payload.frozen)
        generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + ctx.rank)
        state = TrainState(world_size=ctx.world_size, config=cfg.to_dict(), frozen=frozen,
                           dataset_content_id=payload.dataset_content_id)
        loader_state: LoaderState | None = None
        with checkpoint_directory(payload, ctx) as restore_point:
            saved = restore_point.saved if restore_point is not None else None
            elastic = saved is not None and saved.world_size != ctx.world_size
            # On another worker count than configured or saved, each worker's accumulation keeps the
            # global batch (train.elastic_batch); DeepSpeed must be built with it.
            accum = micro_batches(cfg.train, ctx.world_size, global_batch(cfg.train, saved))
            train = replace(cfg.train, grad_accum=accum)
            engine = build_engine(task.module, train, ctx, load_universal=elastic)
            ema = build_ema(engine.module, cfg.train) if ctx.rank == 0 else None  # only rank 0 saves it
            if saved is not None:
                state, loader_state = restore(restore_point, engine, ema, generator, ctx, frozen, payload)
                log.info("rank %d resumed at step %d (written by %d workers, now %d)", ctx.rank, state.step,
                         saved.world_size, ctx.world_size)
        stream = ShardStream(payload.data, rank=ctx.rank, world_size=ctx.world_size,
                             batch_size=cfg.train.batch_size, resolution=cfg.model.resolution, seed=cfg.train.seed,
                             state=loader_state, loader_workers=cfg.train.loader_workers,
                             shuffle_buffer=cfg.train.shuffle_buffer, pin_memory=ctx.device.type == "cuda",
                             holdout_fraction=cfg.validation.holdout_fraction)
        steps = StepLogger.for_worker(payload, ctx, resumed=saved is not None)
        publish_worker_processes(steps, ctx)
        steps.log_dict(engine.ldmflow_config, DEEPSPEED_CONFIG_ARTIFACT)  # rank 0's logger; the others log nothing
        if saved is not None:
            steps.note_resume(state.step)
        state.global_batch = train.batch_size * train.grad_accum * ctx.world_size
        trainer = cls(payload=payload, ctx=ctx, task=task, engine=engine, ema=ema, state=state, stream=stream,
                      generator=generator, steps=steps)
        trainer.train_config = train
        return trainer

    # --- the loop -----------------------------------------------------------------------------

    def train(self) -> None:
        max_steps = self.cfg.train.max_steps
        while self.state.step < max_steps:
            self.train_step()
            last = self.state.step == max_steps
            # Every rank gets the same answer at the same step (training.runtime.stopping).
            stopping = not last and self.stop.due(self.state.step)
            self.log_step(last or stopping)
            self.maybe_validate(last)
            self.maybe_checkpoint(last, now=stopping)
            if stopping:
                if self.ctx.rank == 0:
                    log.info("stopped on request at step %d, with its checkpoint", self.state.step)
                return

    def train_step(self) -> None:
        """One optimizer step: train.grad_accum micro-batches, each loaded (decoded ahead by the
        loader's processes), forwarded and backpropagated; DeepSpeed steps the optimizer only at the
        accumulation boundary. Then the EMA and the counters."""
        train = self.train_config
        started = time.perf_counter()
        for _ in range(train.grad_accum):
            batch = next(self.batches)
            self.sample_log.add(self.state.step + 1, batch.keys, batch.epochs)
            loss = self.task.loss(self.engine, batch, self.generator)
            self.engine.backward(loss)
            self.engine.step()
            self.window.add(loss, len(batch.captions))  # no read-back: see LossWindow
        if self.ema is not None:
            self.ema.step(self.engine.module.parameters())
        self.state.step += 1
        self.state.samples_seen += train.batch_size * train.grad_accum * self.ctx.world_size
        self.window.end_step(time.perf_counter() - started)

    def log_step(self, last: bool) -> None:
        step = self.state.step
        if step % self.cfg.train.log_every and not last:
            return
        self.metrics = self.window.reduce(self.ctx, self.engine, self.state, self.stream.state)  # a collective
        self.steps.log(self.metrics, step)
        if self.ctx.rank == 0:
            log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s", step, self.cfg.train.max_steps,
                     self.metrics["loss"], self.metrics["lr"], self.metrics["samples_per_sec"])
        self.window = LossWindow()

    def maybe_validate(self, last: bool) -> None:
        if self.validation.due(self.state.step, last):
            self.validation.run(self.state.step, self.steps)
            self.metrics.update(self.validation.metrics)

    def maybe_checkpoint(self, last: bool, *, now: bool = False) -> None:
        step = self.state.step
        if step % self.cfg.train.checkpoint_every and not (last or now):
            return
        began = time.perf_counter()
        self.steps.settle()
        save_and_report(self.engine, self.ema, self.state, self.stream.state, self.generator, self.ctx, self.metrics,
                        self.cfg.train, final=last, weights_file=self.task.weights_file)
        # The step's stall: saving, listing and (sync mode) uploading the checkpoint.
        self.steps.log({"checkpoint_seconds": time.perf_counter() - began}, step)

    def close(self) -> None:
        self.batches.close()  # stops the loader processes
        self.sample_log.close()
        self.steps.close()
