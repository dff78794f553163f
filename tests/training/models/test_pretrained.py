"""Pretrained components from local diffusers folders (nothing downloaded): a whole pipeline folder or
its component folders give the UNet, VAE, CLIP text encoder and tokenizer; the loaded VAE and encoder
set the latent shape, scale and cross-attention width; a pretrained UNet fine-tunes through the
worker's own engine; and each kind of bad model input is one clear error before training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from training.config import config_from_dict
from training.errors import ConfigError
from training.models.assembly import build_components, build_frozen, frozen_hashes
from training.models.folders import ModelPathError

ROOT = Path(__file__).resolve().parents[3]
RESOLUTION = 32  # the VAE below downsamples 4x, the UNet 2x: 8x8 latents
LATENT_CHANNELS = 8  # not the 4 of the config defaults, so nothing can silently assume 4
TEXT_WIDTH = 32
MAX_LENGTH = 12


def clip_tokenizer():
    """A real CLIPTokenizer over a byte-level vocabulary with two merges ("red")."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_unet(**overrides) -> UNet2DConditionModel:
    torch.manual_seed(123)
    config = {"sample_size": 8, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
              "layers_per_block": 1, "block_out_channels": (32, 64),
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": TEXT_WIDTH,
              "attention_head_dim": 4}
    return UNet2DConditionModel(**{**config, **overrides})


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A Stable Diffusion pipeline folder (model_index.json, unet/ vae/ text_encoder/ tokenizer/
    scheduler/) holding tiny random components, as save_pretrained writes it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=LATENT_CHANNELS,
                        sample_size=RESOLUTION, scaling_factor=0.5)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = tmp_path_factory.mktemp("pretrained") / "sd-tiny"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def model_cfg(unet=None, vae=None, text=None, *, unet_fields=None, vae_fields=None, **model):
    """A run config whose model parts come from the given folders (None: built from config)."""
    data = {"resolution": RESOLUTION, "unet": unet_fields or {}, "vae": vae_fields or {},
            "text_encoder": {"max_length": MAX_LENGTH}, **model}
    if unet is not None:
        data["unet"] = {**data["unet"], "pretrained": str(unet)}
    if vae is not None:
        data["vae"] = {**data["vae"], "pretrained": str(vae)}
    if text is not None:
        data["text_encoder"] = {**data["text_encoder"], "name_or_path": str(text)}
    return config_from_dict({"model": data, "train": {"batch_size": 2, "warmup_steps": 0, "num_workers": 1,
                                                       "ema": {"enabled": False}}})


def saved(folder: Path) -> dict[str, torch.Tensor]:
    (weights,) = folder.glob("*.safetensors")
    return load_file(str(weights))


def assert_same_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_one_pipeline_folder_supplies_every_component(pipeline_dir):
    parts = build_components(model_cfg(pipeline_dir, pipeline_dir, pipeline_dir).model, seed=0)
    assert_same_weights(parts.unet, saved(pipeline_dir / "unet"))
    assert_same_weights(parts.vae, saved(pipeline_dir / "vae"))
    assert type(parts.text.model).__name__ == "CLIPTextModel"
    assert type(parts.text.tokenizer).__name__ == "CLIPTokenizer"
    assert parts.text.tokenizer.model_max_length == MAX_LENGTH
    # Latent side, channels and scale are the loaded VAE's, not the config defaults (4x4-fold, 4, 0.18215).
    assert parts.unet.config.sample_size == RESOLUTION // 4
    assert parts.vae.config.latent_channels == LATENT_CHANNELS and parts.vae.config.scaling_factor == 0.5
    assert parts.text.encode(["a red circle"]).shape == (1, MAX_LENGTH, TEXT_WIDTH)


def test_component_folders_load_the_same(pipeline_dir):
    whole = build_components(model_cfg(pipeline_dir, pipeline_dir, pipeline_dir).model, seed=0)
    parts = build_components(model_cfg(pipeline_dir / "unet", pipeline_dir / "vae",
                                       pipeline_dir / "text_encoder").model, seed=0)
    assert_same_weights(parts.unet, whole.unet.state_dict())
    assert frozen_hashes(parts.vae, parts.text) == frozen_hashes(whole.vae, whole.text)
    # text_encoder/ named directly: its tokenizer is the pipeline's tokenizer/ beside it.
    assert parts.text.tokenize(["a red circle"]).input_ids.tolist() == \
        whole.text.tokenize(["a red circle"]).input_ids.tolist()


def test_a_new_unet_takes_its_shape_from_the_loaded_vae_and_clip(pipeline_dir):
    parts = build_components(model_cfg(vae=pipeline_dir, text=pipeline_dir,
                                       unet_fields={"block_out_channels": [32, 32],
                                             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}).model, seed=0)
    config = parts.unet.config
    assert (config.in_channels, config.out_channels) == (LATENT_CHANNELS, LATENT_CHANNELS)
    assert config.cross_attention_dim == TEXT_WIDTH and config.sample_size == RESOLUTION // 4


@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_mask_option_is_what_training_and_sampling_both_use(pipeline_dir, tmp_path, use_mask):
    cfg = model_cfg(vae=pipeline_dir, text=pipeline_dir)
    cfg.model.text_encoder.use_attention_mask = use_mask
    _, text = build_frozen(cfg.model)
    prompts = ["a red circle", "a red circle on a red background"]
    tokens = text.tokenize(prompts)
    states = text.encode(prompts)
    expected = text.model(tokens.input_ids, attention_mask=tokens.attention_mask if use_mask else None)[0]
    assert torch.equal(states, expected)
    # The exported pipeline reads the flag from the encoder's config: it encodes prompts identically.
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(), text_encoder=text.model, tokenizer=text.tokenizer,
                                   unet=tiny_unet(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "exported")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
    assert pipe.text_encoder.config.use_attention_mask is use_mask
    assert torch.equal(pipe.encode_prompt(prompts, "cpu", 1, False)[0], states)
    # A causal CLIP gives the caption's own tokens the same states either way; the states at the
    # padding positions are what the option changes.
    other = text.model(tokens.input_ids, attention_mask=None if use_mask else tokens.attention_mask)[0]
    real = tokens.attention_mask.bool()
    assert torch.allclose(states[real], other[real], atol=1e-6)
    assert not torch.allclose(states[~real], other[~real])


def test_fine_tuning_a_pretrained_unet_steps_through_the_worker_engine(pipeline_dir, process_group):
    from training.runtime.context import WorkerContext
    from training.runtime.engine import build_engine

    cfg = model_cfg(pipeline_dir, pipeline_dir, pipeline_dir)
    parts = build_components(cfg.model, seed=cfg.train.seed)
    start = saved(pipeline_dir / "unet")
    ctx = WorkerContext(rank=0, world_size=1, device=torch.device("cpu"))
    engine = build_engine(parts.unet, cfg.train, ctx)
    assert_same_weights(engine.module, start)
    loss = one_step(cfg, parts, engine, ctx)
    after = engine.module.state_dict()
    assert loss > 0 and all(torch.isfinite(t).all() for t in after.values())
    assert sum(not torch.equal(after[k], start[k]) for k in start) > 0.9 * len(start)


def one_step(cfg, parts, engine, ctx) -> torch.Tensor:
    """One seeded LDM optimizer step of `engine` on two random images; its loss."""
    from training.loader.batch import Batch
    from training.tasks.ldm import LatentDiffusionTask

    batch = Batch(pixels=torch.randint(0, 256, (2, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(0)),
                  captions=["a red circle", "a red square"], keys=["a", "b"])
    loss = LatentDiffusionTask(cfg, parts, device=ctx.device).loss(engine, batch, torch.Generator().manual_seed(1))
    engine.backward(loss)
    engine.step()
    return loss


@pytest.mark.slow
def test_a_pretrained_unet_loads_into_zero_init_partitions(pipeline_dir, process_group, tmp_path):
    """train.deepspeed.zero_init with model.unet.pretrained: the UNet is built partitioned from its
    config.json and the file's weights are copied in one parameter at a time; gathered, they are the
    saved ones exactly, and the engine fine-tunes from them. A folder with pickled weights only is refused
    (nothing here unpickles model files)."""
    import deepspeed

    from training.runtime.context import WorkerContext
    from training.runtime.engine import build_engine, module_init

    data = model_cfg(pipeline_dir, pipeline_dir, pipeline_dir).to_dict()
    data["train"].update(zero_stage=3, deepspeed={"zero_init": True})
    cfg = config_from_dict(data)
    parts = build_components(cfg.model, seed=cfg.train.seed, unet_init=module_init(cfg.train))
    start = saved(pipeline_dir / "unet")
    params = dict(parts.unet.named_parameters())
    assert all(p.numel() == 0 and p.ds_numel == start[name].numel() for name, p in params.items())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        assert_same_weights(parts.unet, start)
    ctx = WorkerContext(rank=0, world_size=1, device=torch.device("cpu"))
    engine = build_engine(parts.unet, cfg.train, ctx)
    loss = one_step(cfg, parts, engine, ctx)
    assert torch.isfinite(loss) and loss > 0

    pickled = tmp_path / "pickled-unet"  # what an old folder may hold: diffusion_pytorch_model.bin only
    shutil.copytree(pipeline_dir / "unet", pickled)
    for weights in pickled.glob("*.safetensors"):
        torch.save(load_file(str(weights)), pickled / "diffusion_pytorch_model.bin")
        weights.unlink()
    data["model"]["unet"]["pretrained"] = str(pickled)
    with pytest.raises(ConfigError, match=r"`model.unet.pretrained`: .*has no diffusion_pytorch_model.safetensors"):
        build_components(config_from_dict(data).model, seed=0, unet_init=module_init(config_from_dict(data).train))


# ------------------------------------------------------------------------------------------------
# Bad model input: one error naming the key, the path and what to do, before any training.
# ------------------------------------------------------------------------------------------------


def copy_without(pipeline_dir: Path, tmp_path: Path, missing: str) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    shutil.rmtree(broken / missing)
    return broken


@pytest.mark.parametrize("missing, key", [("unet", "model.unet.pretrained"), ("vae", "model.vae.pretrained"),
                                          ("text_encoder", "model.text_encoder.name_or_path"),
                                          ("tokenizer", "model.text_encoder.name_or_path")])
def test_a_pipeline_folder_missing_a_component_is_named(pipeline_dir, tmp_path, missing, key):
    broken = copy_without(pipeline_dir, tmp_path, missing)
    with pytest.raises(ModelPathError) as err:
        build_frozen(model_cfg(broken, broken, broken).model)
    message = str(err.value)
    assert f"`{key}`" in message and str(broken) in message and f"no {missing}/" in message


def test_a_missing_vae_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"`model.vae.pretrained`: {tmp_path / 'no-vae'} does not exist"):
        build_frozen(model_cfg(vae=tmp_path / "no-vae").model)


def test_a_component_of_the_wrong_kind_is_named(pipeline_dir):
    with pytest.raises(ConfigError, match="`model.vae.pretrained`: .*unet holds a UNet2DConditionModel; expected "
                                          "AutoencoderKL"):
        build_frozen(model_cfg(vae=pipeline_dir / "unet").model)


def test_vae_latent_channels_must_match_the_unet(pipeline_dir, tmp_path):
    # Configured in_channels against a pretrained 8-channel VAE.
    cfg = model_cfg(vae=pipeline_dir, text=pipeline_dir)
    cfg.model.unet.in_channels = 4
    with pytest.raises(ConfigError, match="`model.unet.in_channels` is 4 but .*sd-tiny has 8 latent channels"):
        build_frozen(cfg.model)
    # A pretrained 8-channel UNet against a 4-channel VAE built from config.
    with pytest.raises(ConfigError, match="`model.unet.pretrained`: the UNet at .* has in_channels 8, but the VAE "
                                          "built from model.vae has 4 latent channels"):
        build_frozen(model_cfg(unet=pipeline_dir, text=pipeline_dir,
                               vae_fields={"block_out_channels": [32, 32, 32]}).model)


def test_text_width_must_match_the_unet(pipeline_dir):
    cfg = model_cfg(vae=pipeline_dir, text=pipeline_dir)
    cfg.model.unet.cross_attention_dim = 768  # sd15's pin, with a 32-wide CLIP
    with pytest.raises(ConfigError, match="`model.unet.cross_attention_dim` is 768 but the text encoder .* gives "
                                          "32-wide states"):
        build_frozen(cfg.model)
    # A pretrained UNet made for CLIP, with MiniLM (384).
    with pytest.raises(ConfigError, match="has cross_attention_dim 32, but the text encoder builtin:minilm-l6 "
                                          "gives 384-wide states"):
        build_frozen(model_cfg(unet=pipeline_dir, vae=pipeline_dir).model)


def test_a_resolution_the_vae_cannot_divide(pipeline_dir):
    with pytest.raises(ConfigError, match="`model.resolution` must be a multiple of 8 .* downsamples by 4, the "
                                          "UNet's 2 levels by 2., got 36"):
        build_frozen(model_cfg(pipeline_dir, pipeline_dir, pipeline_dir, resolution=36).model)


def test_a_unet_needing_extra_conditioning_is_refused(pipeline_dir, tmp_path):
    # SDXL-style micro-conditioning: the forward needs added_cond_kwargs this trainer does not feed.
    tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8).save_pretrained(tmp_path / "xl-unet")
    with pytest.raises(ConfigError, match="addition_embed_type='text_time'"):
        build_frozen(model_cfg(tmp_path / "xl-unet", pipeline_dir, pipeline_dir).model)


def test_cli_refuses_a_missing_vae_before_any_run(capsys, tmp_path):
    from pipelines.cli import main

    main(["synth", "--out", str(tmp_path / "raw"), "--n", "4"])
    main(["shard", "--source", str(tmp_path / "raw"), "--output", str(tmp_path / "s64"), "--no-progress"])
    capsys.readouterr()
    code = main(["train", "--config", "tiny", "--data", str(tmp_path / "s64"),
                 "--set", f"model.vae.pretrained={tmp_path / 'no-vae'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.vae.pretrained" in err and str(tmp_path / "no-vae") in err
    assert len(err.splitlines()) == 1
