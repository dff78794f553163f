"""The MLflow pyfunc flavour of a registered text-to-image model ("models from code").

MLflow copies this file into the model, so a consumer needs MLflow, diffusers and torch but not this
project. ``predict`` takes prompts (a DataFrame column ``prompt``, a list, or one string) and the
params ``sampler`` ("ddim" or "dpm++"), ``steps``, ``guidance`` and ``seed``; it returns uint8 images
shaped (N, H, W, 3). A request that leaves out sampler, steps or guidance gets the defaults the
pipeline folder records (sampler_defaults.json). All prompts go through one batched pipeline call;
image i starts from the noise of seed + i, so a request is reproducible image by image and image i
of a batch is the image its prompt gives alone with seed + i.
"""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pandas as pd
import torch

PIPELINE_ARTIFACT = "pipeline"
SAMPLER_DEFAULTS_FILE = "sampler_defaults.json"  # training/samplers.py DEFAULTS_FILE
DEFAULT_PARAMS = {"sampler": "ddim", "steps": 25, "guidance": 5.0, "seed": 0}
"""For a folder exported before it recorded its defaults."""
SAMPLERS = ("ddim", "dpm++")


def build_scheduler(name: str, config):
    """The `name` sampler over the noise schedule of `config`. A copy of training/samplers.py's
    build_scheduler (this file may import only MLflow, diffusers, torch and numpy); a test keeps them equal."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    spacing = "trailing" if config.get("rescale_betas_zero_snr") else "leading"
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                         timestep_spacing=spacing)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       steps_offset=1, timestep_spacing=spacing)
    raise ValueError(f"param `sampler` must be one of {', '.join(SAMPLERS)}, got {name!r}")


def load_pipeline(path: str):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    # A local folder of five components loads in well under a second: no "Loading pipeline
    # components" bar in the consumer's output (diffusers' bars are one global switch).
    diffusers_logging.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    finally:
        diffusers_logging.enable_progress_bar()
    if torch.cuda.is_available():
        pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recorded_defaults(path: str) -> dict:
    """DEFAULT_PARAMS updated with the sampler, steps and guidance the pipeline folder records."""
    file = os.path.join(path, SAMPLER_DEFAULTS_FILE)
    if not os.path.isfile(file):
        return dict(DEFAULT_PARAMS)
    with open(file) as f:
        recorded = json.load(f)
    return {**DEFAULT_PARAMS, **{k: recorded[k] for k in ("sampler", "steps", "guidance") if k in recorded}}


def generate_images(pipe, prompts: list[str], *, steps: int, guidance: float, seed: int,
                    sampler: str | None = None) -> np.ndarray:
    """One batched, classifier-free-guided call of `pipe` for all `prompts`; image i starts from
    torch.randn seeded with seed + i (drawn on the CPU, so the same on any device). `sampler` None
    samples with pipe's own scheduler; a name builds that sampler from pipe's scheduler config for
    this call only: `pipe` itself is left as it was."""
    if sampler is not None:
        from diffusers import StableDiffusionPipeline

        scheduler = build_scheduler(sampler, pipe.scheduler.config)
        # A second pipeline over the same modules, so concurrent requests never share a scheduler's state.
        pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler}, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    device = pipe.device
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    latents = torch.stack([
        torch.randn(
            (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size),
            generator=g,
        )
        for g in generators
    ]).to(device, pipe.unet.dtype)
    with torch.inference_mode():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="np")
    return (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    return [str(p) for p in model_input]


class TextToImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        path = context.artifacts[PIPELINE_ARTIFACT]
        self.pipe = load_pipeline(path)
        self.defaults = recorded_defaults(path)

    # Annotated as MLflow serves it (a DataFrame of prompts; a list or a string also work): with a
    # DataFrame hint MLflow keeps the logged signature instead of inferring one, and says nothing.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        p = {**self.defaults, **(params or {})}
        prompts = _prompts(model_input)
        if not prompts:
            raise ValueError("predict needs at least one prompt")
        if p["sampler"] not in SAMPLERS:
            raise ValueError(f"param `sampler` must be one of {', '.join(SAMPLERS)}, got {p['sampler']!r}")
        if int(p["steps"]) < 1:
            raise ValueError(f"param `steps` must be >= 1, got {p['steps']!r}")
        return generate_images(self.pipe, prompts, steps=int(p["steps"]), guidance=float(p["guidance"]),
                               seed=int(p["seed"]), sampler=p["sampler"])


mlflow.models.set_model(TextToImageModel())
