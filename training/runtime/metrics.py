"""What the loop reports: the loss window, the MLflow logger of rank 0, the process behind each
rank, and the optional per-batch sample audit.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from training.checkpoint.layout import TrainState
from training.loader.plan import LoaderState
from training.mlops.tracking import BufferedMetricLogger, cap_http_retries
from training.runtime.context import WorkerContext, WorkerPayload

log = logging.getLogger(__name__)


class SampleLog:
    """With LDMFLOW_SAMPLE_LOG set on the driver (a folder every worker can write), each rank appends
    the keys of every batch it trains on to <folder>/rank-<r>-<pid>.jsonl, one line per micro-batch:
    an audit of which samples a run saw, and in what order, across restarts."""

    def __init__(self, folder: str | None, rank: int):
        self.file = None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(folder) / f"rank-{rank}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115 - closed by close()
        self.rank = rank

    def add(self, step: int, keys: list[str], epochs: list[int]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "rank": self.rank, "keys": keys, "epochs": epochs}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class LossWindow:
    """Loss and throughput since the last log line. The losses add up where they were computed (on
    the GPU): reading one back would wait for every kernel queued before it, on every micro-batch;
    only `reduce`, at log steps, reads the sum."""

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.count, self.samples, self.elapsed, self.steps = 0, 0, 0.0, 0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum = self.loss_sum + loss.detach().to(torch.float64)
        self.count += 1
        self.samples += samples

    def end_step(self, seconds: float) -> None:
        self.elapsed += seconds
        self.steps += 1

    def reduce(self, ctx: WorkerContext, engine, state: TrainState, loader: LoaderState) -> dict[str, float]:
        # Mean loss over all ranks; throughput of the slowest rank (the step waits for it anyway).
        loss_sum = torch.as_tensor(self.loss_sum, dtype=torch.float64).reshape(1).to(ctx.device)
        counts = torch.tensor([self.count, self.samples], dtype=torch.float64, device=ctx.device)
        t = torch.cat([loss_sum, counts])
        # The slowest rank's time and the largest rank's memory: one MAX reduction for both.
        worst = torch.tensor([self.elapsed, memory_mb(ctx.device)], dtype=torch.float64)
        if dist.is_initialized():
            worst = worst.to(ctx.device)
            dist.all_reduce(t)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        loss_sum, count, samples = t.tolist()
        elapsed, memory = worst.tolist()
        metrics = {
            "loss": loss_sum / max(count, 1),
            "lr": float(engine.get_lr()[0]),
            "samples_per_sec": samples / max(elapsed, 1e-9),
            "step_seconds": elapsed / max(self.steps, 1),
            "epoch": float(loader.epoch),
            "samples_seen": float(state.samples_seen),
            MEMORY_METRIC[ctx.device.type == "cuda"]: memory,
        }
        norm = engine.get_global_grad_norm()  # of the last optimizer step; None before the first
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        return metrics


MEMORY_METRIC = {False: "memory_rss_mb", True: "memory_cuda_max_allocated_mb"}
"""The memory metric's name: a CPU rank's resident set, a GPU rank's peak allocated CUDA memory."""


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


SETTLE_S = 5.0
"""The longest a checkpoint waits for the metrics before it to reach a server that answers."""


class StepLogger:
    """Rank 0's MLflow logging for the loop, gated in one place: after a restart, the steps between
    the checkpoint and the failure may have reached MLflow already; the resumed run recomputes them
    exactly, so steps up to `logged_through` are not logged twice. Every other rank holds one with
    no logger, which logs nothing."""

    def __init__(self, logger: BufferedMetricLogger | None = None, logged_through: int = 0):
        self.logger = logger
        self.logged_through = logged_through

    @classmethod
    def for_worker(cls, payload: WorkerPayload, ctx: WorkerContext, *, resumed: bool) -> StepLogger:
        if ctx.rank != 0 or not payload.mlflow_run_id:
            return cls()
        # Delivery happens on the logger's own thread with its own back-off; one request waiting out
        # MLflow's default retries (7, up to 120 s apart) would only hold that thread, but it would
        # also hold the bounded flush at the end of training.
        cap_http_retries()
        logger = BufferedMetricLogger(payload.mlflow_run_id, payload.tracking_uri)
        try:
            # From the server, never guessed: an outage now is retried (bounded), then fails the start.
            logged_through = logger.last_logged_step("loss") if resumed else 0
        except Exception:
            logger.close(timeout=0)
            raise
        return cls(logger, logged_through)

    def note_resume(self, step: int) -> None:
        """A restart is part of the run's history: MLflow shows it beside the loss curve."""
        if self.logger is not None:
            self.logger.log({"resumed_from_step": step}, step=step)

    def logs(self, step: int) -> bool:
        """Whether metrics of `step` go to MLflow."""
        return self.logger is not None and step > self.logged_through

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Buffered and returned at once: the logger's thread delivers it (BufferedMetricLogger)."""
        if self.logs(step):
            self.logger.log(metrics, step=step)

    def log_image(self, image, artifact_file: str, step: int) -> None:
        if self.logs(step):
            self.logger.log_image(image, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """A JSON artifact of the run (not tied to a step: logged again, it replaces the earlier one)."""
        if self.logger is not None:
            self.logger.log_dict(data, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.logger is not None:
            self.logger.set_tags(tags)

    def settle(self) -> None:
        """Before a checkpoint: deliver what is buffered, waiting at most SETTLE_S and only while the
        server answers. A resume from this checkpoint never recomputes the steps up to it, so metrics
        of those steps still buffered when the run dies (a killed driver takes the workers with it)
        would be lost for good. In an outage training does not wait: the buffer rides it out."""
        if self.logger is not None and self.logger.failures == 0:
            self.logger.flush(timeout=SETTLE_S)

    def close(self) -> None:
        """Bounded: what cannot be delivered within the logger's close_timeout is counted and said."""
        if self.logger is not None:
            self.logger.close()


def publish_worker_processes(steps: StepLogger, ctx: WorkerContext) -> None:
    """Tag the MLflow run with the process behind each rank, `worker.rank<N>` = "<host> <pid>"
    (rewritten whenever the worker group restarts), so a rank's process can be found and signalled.
    Every rank must call it (it is a collective); only rank 0, which holds the logger, writes."""
    me = f"{socket.gethostname()} {os.getpid()}"
    processes = [me]
    if dist.is_initialized():
        processes = [""] * ctx.world_size
        dist.all_gather_object(processes, me)
    steps.set_tags({f"worker.rank{r}": p for r, p in enumerate(processes)})
