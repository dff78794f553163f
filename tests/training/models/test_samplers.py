"""Sampling an exported pipeline: DDIM and DPM-Solver++ over the training schedule, classifier-free
guidance, one seed per image, one batched call, and the defaults the pipeline folder records. A tiny
random pipeline (32 px) is saved once; the pyfunc model loads it as MLflow would, minus MLflow."""

from __future__ import annotations

import inspect
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from tests.training.tiny_pipeline import save_tiny_pipeline
from training.config import NoiseSchedulerConfig
from training.mlops import pyfunc_model
from training.mlops.export import write_defaults
from training.mlops.registry import signature
from training.models.noise import build_noise_scheduler, sampling_scheduler
from training.models.sampling import DEFAULTS_FILE, SAMPLERS, SamplerDefaults, build_scheduler, read_defaults

PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
           "a green star on a white background"]
RECORDED = SamplerDefaults(sampler="dpm++", steps=3, guidance=2.0)
STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("samplers") / "pipeline", RECORDED)


@pytest.fixture(scope="module")
def model(folder):
    m = pyfunc_model.TextToImageModel()
    m.load_context(SimpleNamespace(artifacts={pyfunc_model.PIPELINE_ARTIFACT: str(folder)}))
    return m


def generate(model, prompts, **params):
    return model.predict(None, prompts, {"steps": STEPS, "guidance": 5.0, "seed": 0, **params})


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_generates_seeded_images(model, sampler):
    a = generate(model, PROMPTS[:2], sampler=sampler, seed=7)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert a.std() > 1  # not a blank image
    assert np.array_equal(a, generate(model, PROMPTS[:2], sampler=sampler, seed=7))
    assert not np.array_equal(a, generate(model, PROMPTS[:2], sampler=sampler, seed=8))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_image_i_of_a_batch_is_its_prompt_alone_with_seed_plus_i(model, sampler):
    batch = generate(model, PROMPTS, sampler=sampler, seed=3)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], sampler=sampler, seed=3 + i)[0]
        # One uint8 level at most: CPU kernels round a batch of 6 (3 prompts with and without the
        # text) differently from a batch of 2, by ~1e-6 before the quantisation to 8 bits.
        assert np.abs(batch[i].astype(int) - alone.astype(int)).max() <= 1


def test_samplers_and_guidance_change_the_image(model):
    ddim = generate(model, PROMPTS[:1], sampler="ddim")
    assert not np.array_equal(ddim, generate(model, PROMPTS[:1], sampler="dpm++"))
    assert not np.array_equal(ddim, generate(model, PROMPTS[:1], sampler="ddim", guidance=1.0))


def test_a_request_does_not_change_the_models_scheduler(model):
    before = dict(model.pipe.scheduler.config)
    generate(model, PROMPTS[:1], sampler="dpm++")
    assert type(model.pipe.scheduler).__name__ == "DDIMScheduler" and dict(model.pipe.scheduler.config) == before


def test_recorded_defaults_round_trip_and_serve_a_param_less_request(folder, model, tmp_path):
    assert read_defaults(folder) == RECORDED
    write_defaults(tmp_path, SamplerDefaults(steps=9))
    assert read_defaults(tmp_path) == SamplerDefaults(sampler="ddim", steps=9, guidance=5.0)
    assert read_defaults(tmp_path / "older-export") == SamplerDefaults()
    assert (folder / "model_index.json").is_file() and (folder / DEFAULTS_FILE).is_file()

    recorded = {"sampler": "dpm++", "steps": 3, "guidance": 2.0, "seed": 0}
    assert np.array_equal(model.predict(None, PROMPTS[:1]), generate(model, PROMPTS[:1], **recorded))
    # Through MLflow a missing param is filled from the signature: the same recorded values.
    # height/width None: the size the model was trained at.
    params = {p.name: p.default for p in signature(read_defaults(folder)).params.params}
    assert params == {**recorded, "height": None, "width": None}
    assert np.array_equal(model.predict(None, PROMPTS[:1], params), generate(model, PROMPTS[:1], **recorded))


@pytest.mark.parametrize("kwargs,field", [({"sampler": "euler"}, "sampler"), ({"steps": 0}, "steps"),
                                          ({"guidance": 0.5}, "guidance")])
def test_bad_defaults_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SamplerDefaults(**kwargs)


def test_unknown_sampler_request_is_refused(model):
    with pytest.raises(ValueError, match="param `sampler` must be one of ddim, dpm\\+\\+"):
        generate(model, PROMPTS[:1], sampler="euler")


@pytest.mark.parametrize("zero_snr", [False, True])
def test_both_samplers_sample_the_training_schedule(zero_snr, tmp_path):
    cfg = NoiseSchedulerConfig(zero_terminal_snr=zero_snr, prediction_type="v_prediction" if zero_snr else "epsilon")
    train = build_noise_scheduler(cfg)
    exported = sampling_scheduler(train)  # what the export saves in scheduler/
    exported.save_config(tmp_path)
    saved = DDIMScheduler.load_config(tmp_path)
    assert settings(build_scheduler("ddim", train.config)) == settings(exported)
    for name in SAMPLERS:
        sampler = build_scheduler(name, train.config)
        sampler.set_timesteps(10)
        # Trailing spacing only for zero terminal SNR: the first step is then t = T-1, pure noise.
        assert sampler.config.timestep_spacing == ("trailing" if zero_snr else "leading")
        assert (sampler.timesteps[0].item() == 999) == zero_snr
        assert sampler.config.prediction_type == cfg.prediction_type
        # DPM-Solver moves a zero terminal alpha_bar to 2^-24, where its log-SNR is finite.
        assert torch.allclose(sampler.alphas_cumprod[:-1], train.alphas_cumprod[:-1])
        # The same sampler from the scheduler config a pipeline folder saved as from the training one.
        other = build_scheduler(name, saved)
        assert type(other) is type(sampler) and settings(other) == settings(sampler)
    dpm = build_scheduler("dpm++", train.config)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2


def test_a_pipeline_folder_loaded_directly_samples_with_this_projects_module(model):
    # No model_config (a folder, not a registered model): the pyfunc uses training.models.sampling
    # itself, and its defaults are the folder's recorded ones.
    from training.models import sampling

    assert model.sampling is sampling
    assert model.defaults == {**asdict(RECORDED), "seed": 0}


def settings(scheduler) -> dict:
    """The config entries `scheduler`'s class takes (from_config also keeps a source's other keys)."""
    taken = inspect.signature(type(scheduler).__init__).parameters
    return {k: v for k, v in scheduler.config.items() if k in taken}
