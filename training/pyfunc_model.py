"""The MLflow pyfunc flavour of a registered text-to-image model ("models from code").

MLflow copies this file into the model, so a consumer needs MLflow, diffusers and torch but not this
project. ``predict`` takes prompts (a DataFrame column ``prompt``, a list, or one string) and the
params ``steps``, ``guidance`` and ``seed``; it returns uint8 images shaped (N, H, W, 3).
Image i uses seed + i, so a request is reproducible image by image.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

PIPELINE_ARTIFACT = "pipeline"
DEFAULT_PARAMS = {"steps": 25, "guidance": 5.0, "seed": 0}


def load_pipeline(path: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    if torch.cuda.is_available():
        pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_images(pipe, prompts: list[str], *, steps: int, guidance: float, seed: int) -> np.ndarray:
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
        self.pipe = load_pipeline(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input, params=None):
        p = {**DEFAULT_PARAMS, **(params or {})}
        prompts = _prompts(model_input)
        if not prompts:
            raise ValueError("predict needs at least one prompt")
        return generate_images(self.pipe, prompts, steps=int(p["steps"]), guidance=float(p["guidance"]),
                               seed=int(p["seed"]))


mlflow.models.set_model(TextToImageModel())
