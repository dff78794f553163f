"""The loop's phases on a stand-in engine and task: what a step does on the hot path."""

from __future__ import annotations

import torch

from training.checkpoint.layout import TrainState
from training.config import load_config
from training.loader.batch import Batch
from training.loader.plan import LoaderState
from training.runtime.context import WorkerContext
from training.runtime.loop import Trainer
from training.runtime.metrics import LossWindow, SampleLog


class NoReadBack(torch.Tensor):
    """A loss whose value may not be read on the host: that would wait for the GPU on every micro-batch."""

    def __float__(self):
        raise AssertionError("the loss was read back during the step")

    def item(self):
        raise AssertionError("the loss was read back during the step")


class Engine:
    def __init__(self):
        self.module = torch.nn.Linear(2, 2)
        self.steps = 0

    def backward(self, loss):
        pass

    def step(self):
        self.steps += 1

    def get_lr(self):
        return [1e-3]

    def get_global_grad_norm(self):  # DeepSpeed's: the last optimizer step's norm, None before one
        return 0.75 if self.steps else None


class Task:
    def loss(self, engine, batch, generator):
        return torch.Tensor._make_subclass(NoReadBack, torch.tensor(0.25 * len(batch.keys)))


def test_a_step_never_reads_the_loss_back_and_the_log_step_averages_it():
    cfg = load_config("tiny", ["train.grad_accum=3", "train.batch_size=2"])
    trainer = Trainer.__new__(Trainer)  # the phases, without building a real engine and stream
    trainer.cfg, trainer.ctx = cfg, WorkerContext(rank=0, world_size=1, device=torch.device("cpu"))
    trainer.task, trainer.engine, trainer.ema, trainer.generator = Task(), Engine(), None, torch.Generator()
    trainer.train_config = cfg.train
    trainer.state = TrainState(world_size=1)
    trainer.window, trainer.sample_log = LossWindow(), SampleLog(None, 0)
    batch = Batch(pixels=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), captions=["a", "b"], keys=["a", "b"])
    trainer.batches = iter([batch] * 6)
    trainer.train_step()
    trainer.train_step()
    assert trainer.engine.steps == 6 and trainer.state.step == 2 and trainer.state.samples_seen == 12
    metrics = trainer.window.reduce(trainer.ctx, trainer.engine, trainer.state, LoaderState())
    assert metrics["loss"] == 0.5 and metrics["samples_seen"] == 12.0 and metrics["grad_norm"] == 0.75


def test_another_worker_count_keeps_the_global_batch_or_says_why_not(caplog):
    """Before, the batch was per worker: resuming 32 workers' run on 16 halved the global batch."""
    import logging

    import pytest

    from training.errors import ConfigError
    from training.runtime.engine import micro_batches
    from training.runtime.loop import global_batch

    train = load_config("tiny", ["train.batch_size=8", "train.grad_accum=1", "train.num_workers=4"]).train
    assert global_batch(train, None) == 32
    assert micro_batches(train, 4, 32) == 1
    assert micro_batches(train, 2, 32) == 2 and micro_batches(train, 1, 32) == 4  # 32 samples a step on any
    with pytest.raises(ConfigError, match="cannot be kept on 3 workers.*elastic_batch=per_worker"):
        micro_batches(train, 3, 32)
    saved = TrainState(world_size=4, config={"train": {"batch_size": 8, "grad_accum": 1}})  # before it was recorded
    assert global_batch(train, saved) == 32
    assert global_batch(train, TrainState(world_size=2, global_batch=64)) == 64

    per_worker = load_config("tiny", ["train.batch_size=8", "train.num_workers=4",
                                      "train.elastic_batch=per_worker"]).train
    with caplog.at_level(logging.WARNING):
        assert micro_batches(per_worker, 2, 32) == 1
    assert "global batch changes from 32 to 16" in caplog.text and "lr stays" in caplog.text
