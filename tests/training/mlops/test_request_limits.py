"""The served model's request limits: recorded in the pipeline folder from the run config's `serving`
section, enforced in predict before any work with one clear message (an MlflowException of
INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400), and prompts generated at
most max_batch per pipeline call. The same folder also loads with diffusers' own
StableDiffusionPipeline.from_pretrained and generates there."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from tests.training.tiny_pipeline import tiny_pipeline
from training.config import ServingConfig, load_config
from training.errors import ConfigError
from training.mlops import pyfunc_model
from training.mlops.export import request_limits, save_pipeline
from training.models.sampling import LIMITS_FILE, RequestLimits, SamplerDefaults, read_limits

PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
           "a green star on a white background"]
LIMITS = RequestLimits(max_prompts=3, max_batch=2, max_steps=4, min_guidance=1.0, max_guidance=8.0,
                       max_image_size=48)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_pipeline(tiny_pipeline(), tmp_path_factory.mktemp("limits") / "pipeline",
                         SamplerDefaults(steps=2), LIMITS)


@pytest.fixture(scope="module")
def model(folder):
    m = pyfunc_model.TextToImageModel()
    m.load_context(SimpleNamespace(artifacts={pyfunc_model.PIPELINE_ARTIFACT: str(folder)}))
    return m


def test_the_folder_records_the_limits_and_the_model_enforces_them(folder, model):
    assert json.loads((folder / LIMITS_FILE).read_text())["max_prompts"] == 3
    assert read_limits(folder) == LIMITS and model.limits == LIMITS
    assert read_limits(folder / "older-export") == RequestLimits()  # a folder from before limits


@pytest.mark.parametrize("request_input,params,message", [
    (PROMPTS + PROMPTS[:1], {}, "at most 3 prompts, got 4"),
    (PROMPTS[:1], {"steps": 5}, "param `steps` must be between 1 and 4, got 5"),
    (PROMPTS[:1], {"steps": 0}, "param `steps` must be between 1 and 4, got 0"),
    (PROMPTS[:1], {"guidance": 8.5}, "param `guidance` must be between 1 and 8, got 8.5"),
    (PROMPTS[:1], {"guidance": 0.5}, "param `guidance` must be between 1 and 8, got 0.5"),
    (PROMPTS[:1], {"height": 64}, "param `height` must be a multiple of 8 between 8 and 48 pixels, got 64"),
    (PROMPTS[:1], {"width": 36}, "param `width` must be a multiple of 8 between 8 and 48 pixels, got 36"),
    (PROMPTS[:1], {"steps": "many"}, "param `steps` must be an integer, got 'many'"),
    (PROMPTS[:1], {"sampler": "euler"}, "param `sampler` must be one of ddim, dpm++"),
    ([], {}, "a request needs at least one prompt"),
    (pd.DataFrame({"text": PROMPTS[:1]}), {}, "the input table needs a `prompt` column (one prompt per row), "
                                              "got columns ['text']"),
])
def test_a_request_outside_the_limits_is_refused_with_a_400_message(model, monkeypatch, request_input, params,
                                                                     message):
    from mlflow.exceptions import MlflowException

    # Refused before any work: the pipeline is never called.
    monkeypatch.setattr(model.sampling, "generate_images", lambda *a, **k: pytest.fail("generated anyway"))
    with pytest.raises(MlflowException) as refused:
        model.predict(None, request_input, params)
    assert message in refused.value.message
    assert refused.value.get_http_status_code() == 400
    assert isinstance(refused.value, ValueError)  # in-process callers catch bad input as before


def test_prompts_are_generated_max_batch_at_a_time_with_the_same_images(model, monkeypatch):
    calls = []
    real_call = type(model.pipe).__call__

    def counting(pipe, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real_call(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(type(model.pipe), "__call__", counting)
    images = model.predict(None, pd.DataFrame({"prompt": PROMPTS}), {"steps": 2, "seed": 5})
    assert calls == [2, 1]  # max_batch 2: never one unbounded UNet batch
    assert images.shape == (3, 32, 32, 3) and images.std() > 1
    # Chunking does not change an image: image i is its prompt alone with seed + i.
    alone = model.predict(None, [PROMPTS[2]], {"steps": 2, "seed": 7})[0]
    assert np.abs(images[2].astype(int) - alone.astype(int)).max() <= 1


def test_a_request_may_ask_for_another_size_within_the_limit(model):
    images = model.predict(None, PROMPTS[:1], {"steps": 2, "height": 48, "width": 16})
    assert images.shape == (1, 48, 16, 3)
    native = model.predict(None, PROMPTS[:1], {"steps": 2, "height": None, "width": None})
    assert native.shape == (1, 32, 32, 3)  # None (the signature's default): the trained size


def test_model_config_overrides_the_recorded_limits(folder):
    m = pyfunc_model.TextToImageModel()
    m.load_context(SimpleNamespace(artifacts={pyfunc_model.PIPELINE_ARTIFACT: str(folder)},
                                   model_config={pyfunc_model.REQUEST_LIMITS: {"max_steps": 50}}))
    assert m.limits == RequestLimits(**{**LIMITS.__dict__, "max_steps": 50})


def test_serving_config_is_validated_and_becomes_the_models_limits():
    cfg = load_config("tiny", ["serving.max_prompts=16", "serving.max_batch=4", "serving.max_image_size=128"])
    assert request_limits(cfg) == RequestLimits(max_prompts=16, max_batch=4, max_steps=100, min_guidance=1.0,
                                                max_guidance=20.0, max_image_size=128)
    with pytest.raises(ConfigError, match="config key `serving.max_batch` must be >= 1, got 0"):
        ServingConfig(max_batch=0)
    with pytest.raises(ConfigError, match="`serving.max_image_size` must be null or a multiple of 8"):
        ServingConfig(max_image_size=50)
    with pytest.raises(ConfigError, match="`serving.max_guidance` must be >= serving.min_guidance"):
        ServingConfig(min_guidance=3.0, max_guidance=2.0)
    # The model's own defaults must be servable within its limits.
    with pytest.raises(ConfigError, match="`tracking.sample_steps` must be <= serving.max_steps \\(10\\)"):
        load_config("tiny", ["serving.max_steps=10"])
    with pytest.raises(ConfigError, match="`tracking.guidance` must be within serving.min_guidance"):
        load_config("tiny", ["serving.max_guidance=4"])
    with pytest.raises(ConfigError, match="`serving.max_image_size` must be null or >= model.resolution \\(64\\)"):
        load_config("tiny", ["serving.max_image_size=32"])
    with pytest.raises(ConfigError, match="unknown config key `serving.max_images`"):
        load_config("tiny", ["serving.max_images=3"])


def test_the_folder_loads_with_diffusers_own_from_pretrained_and_generates(folder):
    """A consumer with only diffusers: StableDiffusionPipeline.from_pretrained(folder), no arguments.
    model_index.json names transformers' BertModel/BertTokenizerFast (the MiniLM text encoder) where
    Stable Diffusion has CLIPTextModel/CLIPTokenizer: diffusers loads each component by the class its
    folder names, and the pipeline only calls text_encoder(input_ids, attention_mask=...)[0], which
    both answer with (batch, tokens, width) states."""
    from diffusers import StableDiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["safety_checker"] == [None, None]  # nothing to download, no checker to skip

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    out = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0.01


def test_evaluation_asks_no_more_than_the_model_takes(folder):
    """A model that takes 3 prompts a request is evaluated on 8 images in requests of at most 3, not
    refused at the evaluation's default request size of 32."""
    from training.eval.evaluate import evaluate_model

    evaluation = evaluate_model(str(folder), prompts=2, seen=2, per_prompt=2, steps=2)
    assert len(evaluation.images) == 8 and evaluation.metrics["n"] == 4
