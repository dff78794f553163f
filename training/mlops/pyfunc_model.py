"""The MLflow pyfunc flavour of a registered text-to-image model ("models from code").

MLflow copies this file into the model, and training.models.sampling beside it (``code_paths``,
under a name of its own: see training.mlops.registry), so a consumer needs MLflow, diffusers and
torch but not this project. ``predict`` takes prompts (a DataFrame column ``prompt``, a list, or one
string) and the params ``sampler`` ("ddim" or "dpm++"), ``steps``, ``guidance`` and ``seed``; it
returns uint8 images shaped (N, H, W, 3). A request that leaves out sampler, steps or guidance gets
the defaults the pipeline folder records (sampler_defaults.json). All prompts go through one batched
pipeline call; image i starts from the noise of seed + i, so a request is reproducible image by
image and image i of a batch is the image its prompt gives alone with seed + i.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict

import mlflow
import pandas as pd
import torch

PIPELINE_ARTIFACT = "pipeline"
SAMPLING_MODULE = "sampling_module"
"""The model_config key naming the shipped copy of training.models.sampling."""


def sampling_module(model_config: dict | None):
    """The sampling code this model was registered with: the copy in its code/ folder, under the
    name the registry gave it (unique to its content, so two versions loaded in one process keep
    their own code: mlflow/mlflow#12377); this project's own module for a pipeline folder loaded
    directly (evaluate, tests)."""
    name = (model_config or {}).get(SAMPLING_MODULE)
    if name:
        return importlib.import_module(name)
    from training.models import sampling

    return sampling


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


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    return [str(p) for p in model_input]


class TextToImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.sampling = sampling_module(getattr(context, "model_config", None))
        path = context.artifacts[PIPELINE_ARTIFACT]
        self.pipe = load_pipeline(path)
        self.defaults = {**asdict(self.sampling.read_defaults(path)), "seed": 0}

    # Annotated as MLflow serves it (a DataFrame of prompts; a list or a string also work): with a
    # DataFrame hint MLflow keeps the logged signature instead of inferring one, and says nothing.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        p = {**self.defaults, **(params or {})}
        prompts = _prompts(model_input)
        if not prompts:
            raise ValueError("predict needs at least one prompt")
        samplers = self.sampling.SAMPLERS
        if p["sampler"] not in samplers:
            raise ValueError(f"param `sampler` must be one of {', '.join(samplers)}, got {p['sampler']!r}")
        if int(p["steps"]) < 1:
            raise ValueError(f"param `steps` must be >= 1, got {p['steps']!r}")
        return self.sampling.generate_images(self.pipe, prompts, steps=int(p["steps"]), guidance=float(p["guidance"]),
                                             seed=int(p["seed"]), sampler=p["sampler"])


mlflow.models.set_model(TextToImageModel())
