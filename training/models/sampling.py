"""How an exported pipeline is sampled: its samplers, the defaults its folder records, and batched,
seeded generation.

- ``ddim``: DDIM with eta 0 (deterministic), the scheduler the export saves in ``scheduler/``.
- ``dpm++``: DPM-Solver++ 2M (multistep, second order), which usually matches DDIM's quality in about
  half the steps.

Both are built from the training noise schedule's config (betas, prediction type, zero terminal SNR),
so the model is sampled on the schedule it was trained on. A zero-terminal-SNR schedule is sampled
with trailing timestep spacing, so the first step is t = T-1, the pure noise the model learnt to start
from (Lin et al. 2023, section 3.3); any other with leading spacing and steps offset 1, as Stable
Diffusion is sampled.

This module ships inside every registered model (MLflow ``code_paths``, see
training.mlops.registry), so a consumer that has not installed this project samples with the same
code: it imports only the standard library, numpy, torch and diffusers, never ``training`` or
``data_prep``. Importing it is cheap (torch and diffusers load on first use): the CLI reads SAMPLERS
to build its parser.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

SAMPLERS = ("ddim", "dpm++")
"""Sampler names accepted by `build_scheduler`, the pyfunc's `sampler` param and the CLI."""

DEFAULTS_FILE = "sampler_defaults.json"
"""Written into the exported pipeline folder, beside ``model_index.json``."""

LIMITS_FILE = "serving_limits.json"
"""The request limits (RequestLimits), beside DEFAULTS_FILE."""


def build_scheduler(name: str, config: Mapping) -> SchedulerMixin:
    """The `name` sampler over the noise schedule of `config`: the training DDPMScheduler's config or
    the config a pipeline folder saved (either gives the same sampler)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    # Named, not inherited: from_config gives a key the source config left at its default the new
    # class's default instead (DPM-Solver's is linspace), so the spacing would depend on the source.
    spacing = "trailing" if config.get("rescale_betas_zero_snr") else "leading"
    if name == "ddim":
        # set_alpha_to_one=False: the last step lands on alphas_cumprod[0] of the trained schedule,
        # not on a clean image the model never saw; steps_offset=1 as Stable Diffusion samples.
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                         timestep_spacing=spacing)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       steps_offset=1, timestep_spacing=spacing)
    raise ValueError(f"param `sampler` must be one of {', '.join(SAMPLERS)}, got {name!r}")


@dataclass(frozen=True, kw_only=True)
class SamplerDefaults:
    """What a request that names no sampler, steps or guidance gets from an exported pipeline."""

    sampler: str = "ddim"
    """One of SAMPLERS."""
    steps: int = 25
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale; 1 turns guidance off."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler defaults: `sampler` must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler defaults: `steps` must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or self.guidance < 1.0:
            raise ValueError(f"sampler defaults: `guidance` must be a number >= 1, got {self.guidance!r}")
        object.__setattr__(self, "guidance", float(self.guidance))


def read_defaults(pipeline_dir: str | Path) -> SamplerDefaults:
    """The folder's recorded defaults; SamplerDefaults() for a folder exported before they were recorded."""
    path = Path(pipeline_dir) / DEFAULTS_FILE
    if not path.is_file():
        return SamplerDefaults()
    recorded = json.loads(path.read_text())
    return SamplerDefaults(**{k: v for k, v in recorded.items() if k in SamplerDefaults.__dataclass_fields__})


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What one request to an exported pipeline may ask for (the run config's `serving` section; see
    training.config.serving for each field). Checked before any work, so a request over them gets a
    message naming the limit instead of an out-of-memory error half-way through."""

    max_prompts: int = 64
    max_batch: int = 8
    max_steps: int = 100
    min_guidance: float = 1.0
    max_guidance: float = 20.0
    max_image_size: int | None = None
    """None: the pipeline's own size (its UNet's sample size times the VAE's scale factor) only."""

    def __post_init__(self) -> None:
        for key in ("max_prompts", "max_batch", "max_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"request limits: `{key}` must be an integer >= 1, got {value!r}")
        if not 1.0 <= self.min_guidance <= self.max_guidance:
            raise ValueError(f"request limits: need 1 <= min_guidance <= max_guidance, got "
                             f"{self.min_guidance!r} and {self.max_guidance!r}")
        if self.max_image_size is not None and (not isinstance(self.max_image_size, int) or self.max_image_size < 8):
            raise ValueError(f"request limits: `max_image_size` must be null or an integer >= 8, "
                             f"got {self.max_image_size!r}")

    def check(self, *, prompts: int, steps: int, guidance: float, height: int, width: int, native: int,
              size_step: int) -> None:
        """ValueError naming the first param outside the limits. `native` is the pipeline's own image
        side (what max_image_size None allows), `size_step` what a height or width must be a multiple of."""
        if prompts > self.max_prompts:
            raise ValueError(f"a request may ask for at most {self.max_prompts} prompts, got {prompts}: "
                             "split it into several requests")
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"param `steps` must be between 1 and {self.max_steps}, got {steps}")
        if not self.min_guidance <= guidance <= self.max_guidance:
            raise ValueError(f"param `guidance` must be between {self.min_guidance:g} and {self.max_guidance:g}, "
                             f"got {guidance:g}")
        largest = self.max_image_size or native
        for name, value in (("height", height), ("width", width)):
            if not size_step <= value <= largest or value % size_step:
                raise ValueError(f"param `{name}` must be a multiple of {size_step} between {size_step} and "
                                 f"{largest} pixels, got {value}")


def read_limits(pipeline_dir: str | Path) -> RequestLimits:
    """The folder's recorded limits; RequestLimits() for a folder exported before they were recorded."""
    path = Path(pipeline_dir) / LIMITS_FILE
    if not path.is_file():
        return RequestLimits()
    recorded = json.loads(path.read_text())
    return RequestLimits(**{k: v for k, v in recorded.items() if k in RequestLimits.__dataclass_fields__})


def native_size(pipe) -> int:
    """The image side `pipe` was built for: its UNet's latent sample size times the VAE's scale."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def size_step(pipe) -> int:
    """What a height or width must be a multiple of: the VAE's scale (whole latents) and 8, which
    diffusers' StableDiffusionPipeline requires of any size."""
    return math.lcm(8, int(pipe.vae_scale_factor))


def generate_images(pipe, prompts: list[str], *, steps: int, guidance: float, seed: int,
                    sampler: str | None = None, height: int | None = None, width: int | None = None,
                    max_batch: int | None = None) -> np.ndarray:
    """Classifier-free-guided calls of `pipe` for `prompts`, at most `max_batch` prompts a call (None:
    all in one); image i starts from torch.randn seeded with seed + i (drawn on the CPU, so the same on
    any device), whatever the chunking. `height`/`width` None: the pipeline's native size. `sampler`
    None samples with pipe's own scheduler; a name builds that sampler from pipe's scheduler config
    for this call only: `pipe` itself is left as it was."""
    import torch

    if sampler is not None:
        from diffusers import StableDiffusionPipeline

        scheduler = build_scheduler(sampler, pipe.scheduler.config)
        # A second pipeline over the same modules, so concurrent requests never share a scheduler's state.
        pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler}, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    height = height or native_size(pipe)
    width = width or native_size(pipe)
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    max_batch = max_batch or max(len(prompts), 1)
    chunks = []
    for start in range(0, len(prompts), max_batch):
        part = prompts[start:start + max_batch]
        latents = torch.stack([
            torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed + start + i))
            for i in range(len(part))
        ]).to(pipe.device, pipe.unet.dtype)
        with torch.inference_mode():
            out = pipe(part, num_inference_steps=steps, guidance_scale=guidance, latents=latents, height=height,
                       width=width, output_type="np")
        chunks.append((np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8))
    return np.concatenate(chunks)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) image, row-major."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid
