"""The MLflow pyfunc flavour of a registered text-to-image model ("models from code").

MLflow copies this file into the model, and training.models.sampling beside it (``code_paths``,
under a name of its own: see training.mlops.registry), so a consumer needs MLflow, diffusers and
torch but not this project. ``predict`` takes prompts (a DataFrame column ``prompt``, a list, or one
string) and the params ``sampler`` ("ddim" or "dpm++"), ``steps``, ``guidance``, ``seed``,
``height`` and ``width``; it returns uint8 images shaped (N, H, W, 3). A request that leaves out
sampler, steps or guidance gets the defaults the pipeline folder records (sampler_defaults.json);
one that leaves out height or width gets the size the model was trained at.

Limits. The folder also records what one request may ask for (serving_limits.json, from the run
config's `serving` section; a ``request_limits`` mapping in the model_config overrides fields of it
at load time): prompts per request, steps, guidance range, image size. A request outside them, a
table without a ``prompt`` column or an unknown sampler is refused before any work with
InvalidRequest, an MlflowException of INVALID_PARAMETER_VALUE (and a ValueError), which
`mlflow models serve` answers with HTTP 400 and the message in its ``message`` field. Prompts are
generated ``max_batch`` at a time, so a request's memory is bounded whatever its length. Image i
starts from the noise of seed + i, so a request is reproducible image by image and image i of a
request is the image its prompt gives alone with seed + i.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

PIPELINE_ARTIFACT = "pipeline"
SAMPLING_MODULE = "sampling_module"
"""The model_config key naming the shipped copy of training.models.sampling."""
REQUEST_LIMITS = "request_limits"
"""The model_config key whose mapping overrides fields of the folder's recorded limits."""


class InvalidRequest(MlflowException, ValueError):
    """A request the model refuses. MLflow's scoring server turns an MlflowException raised in
    predict into an HTTP response with the exception's status (400 for INVALID_PARAMETER_VALUE) and
    message, where any other exception becomes a 400 whose message hides the cause; a ValueError too,
    so in-process callers catch it as the bad input it is."""


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


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest.invalid_parameter_value(message)


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        # Never another column in its place: a table of something else would generate from it.
        if "prompt" not in model_input.columns:
            raise _refuse(f"the input table needs a `prompt` column (one prompt per row), got columns "
                          f"{[str(c) for c in model_input.columns]}")
        return [str(p) for p in model_input["prompt"].tolist()]
    if isinstance(model_input, dict):  # {"inputs": {"prompt": [...]}} served without a schema
        if "prompt" not in model_input:
            raise _refuse(f"the input needs a `prompt` field, got {sorted(map(str, model_input))}")
        value = model_input["prompt"]
        return [value] if isinstance(value, str) else [str(p) for p in value]
    return [str(p) for p in model_input]


def _integer(params: dict, name: str) -> int:
    value = params[name]
    try:
        if isinstance(value, bool) or float(value) != int(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise _refuse(f"param `{name}` must be an integer, got {value!r}") from None


class TextToImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.sampling = sampling_module(getattr(context, "model_config", None))
        path = context.artifacts[PIPELINE_ARTIFACT]
        self.pipe = load_pipeline(path)
        self.defaults = {**asdict(self.sampling.read_defaults(path)), "seed": 0}
        # Models registered before limits existed ship a sampling module without them: they keep
        # their own code, and a folder of that time loaded by this code gets RequestLimits().
        override = (getattr(context, "model_config", None) or {}).get(REQUEST_LIMITS) or {}
        recorded = asdict(self.sampling.read_limits(path))
        self.limits = self.sampling.RequestLimits(**{**recorded, **override})

    # Annotated as MLflow serves it (a DataFrame of prompts; a list or a string also work): with a
    # DataFrame hint MLflow keeps the logged signature instead of inferring one, and says nothing.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        # A param MLflow's signature filled with None (height, width) means "the default" too.
        p = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts = _prompts(model_input)
        if not prompts:
            raise _refuse("a request needs at least one prompt")
        samplers = self.sampling.SAMPLERS
        if p["sampler"] not in samplers:
            raise _refuse(f"param `sampler` must be one of {', '.join(samplers)}, got {p['sampler']!r}")
        native = self.sampling.native_size(self.pipe)
        steps, seed = _integer(p, "steps"), _integer(p, "seed")
        height = _integer(p, "height") if "height" in p else native
        width = _integer(p, "width") if "width" in p else native
        try:
            guidance = float(p["guidance"])
        except (TypeError, ValueError):
            raise _refuse(f"param `guidance` must be a number, got {p['guidance']!r}") from None
        try:
            self.limits.check(prompts=len(prompts), steps=steps, guidance=guidance, height=height, width=width,
                              native=native, size_step=self.sampling.size_step(self.pipe))
        except ValueError as e:
            raise _refuse(str(e)) from None
        return self.sampling.generate_images(self.pipe, prompts, steps=steps, guidance=guidance, seed=seed,
                                             sampler=p["sampler"], height=height, width=width,
                                             max_batch=self.limits.max_batch)


mlflow.models.set_model(TextToImageModel())
