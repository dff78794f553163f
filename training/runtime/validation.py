"""Validation on the held-out split at its cadence, with the EMA weights swapped in."""

from __future__ import annotations

import logging
import time

from training.config import RunConfig
from training.loader.batch import read_split
from training.loader.stream import ShardStream
from training.runtime.context import WorkerContext
from training.runtime.metrics import StepLogger
from training.tasks.base import Task

log = logging.getLogger(__name__)


class Validation:
    """Validation on the held-out split (validation.holdout_fraction) every validation.every steps and
    at the final step: the task's validation metrics and, for the `ldm` task, a sample grid of
    tracking.sample_prompts, both logged to MLflow. With EMA, the EMA weights are scored (they are
    what is exported). Under ZeRO-3 every rank takes part (each forward gathers the parameters from
    all ranks); otherwise rank 0 alone, while the others wait at the next step's collective."""

    def __init__(self, task: Task, engine, ema, stream: ShardStream, cfg: RunConfig, ctx: WorkerContext):
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

    def run(self, step: int, steps: StepLogger) -> None:
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
        steps.log(self.metrics, step)
        if grid is not None:
            steps.log_image(grid, f"samples/step-{step:06d}.png", step)
