"""What a run trains: the two tasks of the one training loop (see training.tasks.base.Task).

- `ldm` (`ldmflow train`): the latent diffusion UNet, against a frozen VAE and text encoder.
- `vae` (`ldmflow train-vae`): the first-stage AutoencoderKL itself, on reconstruction + KL.
"""

from __future__ import annotations

import torch

from training.config import RunConfig
from training.models.assembly import build_components, build_frozen, frozen_hashes
from training.tasks.base import Task
from training.tasks.ldm import LatentDiffusionTask
from training.tasks.vae import AutoencoderTask


def build_task(cfg: RunConfig, *, seed: int, device: torch.device, module_init=None) -> Task:
    """The task of `cfg`; its trained module (the UNet, or the `vae` task's AutoencoderKL) is built inside
    `module_init` when given (deepspeed.zero.Init: training.runtime.engine.module_init), nothing else is."""
    if cfg.task == "vae":
        return AutoencoderTask(cfg, seed=seed, device=device, module_init=module_init)
    return LatentDiffusionTask(cfg, build_components(cfg.model, seed=seed, unet_init=module_init), device=device)


def frozen_hashes_for(cfg: RunConfig) -> dict[str, str]:
    """sha256 of the frozen components the run's workers must all hold (driver side, before launch);
    loading them also checks every model path and shape (training.models.assembly.build_frozen)."""
    if cfg.task == "vae":
        return {}  # the VAE task freezes nothing
    vae, text = build_frozen(cfg.model)
    return frozen_hashes(vae, text)
