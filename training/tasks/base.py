"""The task protocol: what one training loop (training.runtime.loop) needs to know of what it trains.

The loop (DeepSpeed engine, data streams, checkpoints, restarts, metrics) is the same for every
task; a task decides what is built, what the loss of a batch is, how held-out samples are scored
and which file the final weights go to.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from training.loader.batch import Batch

VALIDATION_BATCH = 32
"""Held-out samples scored per forward pass."""


class Task(Protocol):
    name: str
    """The config's `task`: "ldm" or "vae"."""
    weights_file: str
    """The final checkpoint's gathered weights of `module` (training.checkpoint.layout UNET_FILE or VAE_FILE)."""
    module: torch.nn.Module
    """What DeepSpeed trains."""

    def frozen_hashes(self) -> dict[str, str]:
        """sha256 of the frozen components this worker holds; every worker must hold the driver's."""

    def loss(self, engine, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The loss of one micro-batch through `engine` (the DeepSpeed engine around `module`)."""

    def validate(self, module: torch.nn.Module, held_out: Batch) -> dict[str, float]:
        """Validation metrics of `module` on the held-out samples (the same inputs every time)."""

    def sample_grid(self, module: torch.nn.Module) -> np.ndarray | None:
        """A uint8 grid of what `module` generates, logged beside the metrics; None when nothing is sampled."""
