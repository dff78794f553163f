"""Every preset's UNet, built on the meta device (no memory, well under a second), against the real
model it claims to be: the same parameter names and shapes as diffusers builds from the published
config, hence the same count, and the attention heads of the right width.

The reference configs are the published `unet/config.json` values of runwayml/stable-diffusion-v1-5
and stabilityai/stable-diffusion-xl-base-1.0, written out here (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from training.config import config_from_dict, load_config
from training.errors import ConfigError
from training.models.assembly import build_unet

ROOT = Path(__file__).resolve().parents[3]
MINILM_WIDTH = 384  # hidden_size of the builtin MiniLM-L6 (tiny and small)

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5, unet/config.json
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128, in_channels=4, out_channels=4, act_fn="silu", addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], center_input_sample=False, cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5, norm_num_groups=32,
    projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=False,
    use_linear_projection=True,
)
SD15_PARAMETERS = 859_520_964
SDXL_PARAMETERS = 2_567_463_684
SDXL_ADD_EMBEDDING = 5_245_440  # add_embedding: pooled text (1280) + 6 size/crop ids x 256 -> 1280


def meta_reference(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def meta_preset(name: str, text_width: int) -> UNet2DConditionModel:
    """The preset's UNet as build_components makes it, for a text encoder of `text_width`."""
    cfg = load_config(name).model
    with torch.device("meta"):
        return build_unet(cfg.unet, sample_size=cfg.latent_size, in_channels=cfg.vae.latent_channels,
                          cross_attention_dim=text_width, seed=0)


def shapes(unet: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(p.shape) for k, p in unet.named_parameters()}


def count(unet: torch.nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters())


def head_layout(unet: torch.nn.Module) -> set[tuple[int, int]]:
    """(heads, head width) of every attention layer."""
    return {(m.heads, m.inner_dim // m.heads) for m in unet.modules() if isinstance(m, Attention)}


def test_sd15_is_exactly_sd15s_unet():
    cfg = load_config("sd15").model
    unet = meta_preset("sd15", cfg.unet.cross_attention_dim)  # the preset pins CLIP ViT-L's 768
    reference = meta_reference(SD15_UNET)
    assert count(reference) == SD15_PARAMETERS
    assert shapes(unet) == shapes(reference)
    assert count(unet) == SD15_PARAMETERS
    # 8 heads everywhere (widths 40/80/160), as SD 1.5 was trained: the count alone cannot tell.
    assert head_layout(unet) == head_layout(reference) == {(8, 40), (8, 80), (8, 160)}
    assert unet.config.sample_size == 64 and unet.config.attention_head_dim == (8, 8, 8, 8)


def test_sdxl_is_sdxl_base_without_the_micro_conditioning():
    """The one difference from SDXL base is stated and exact: its add_embedding (pooled text and
    size/crop ids), which a one-encoder trainer cannot feed. Every other tensor has SDXL's shape."""
    unet = meta_preset("sdxl", 2048)  # SDXL's two encoders, concatenated
    reference = meta_reference(SDXL_UNET)
    ref_shapes = shapes(reference)
    add_embedding = {k: v for k, v in ref_shapes.items() if k.startswith("add_embedding.")}
    assert count(reference) == SDXL_PARAMETERS
    assert sum(p.numel() for k, p in reference.named_parameters() if k in add_embedding) == SDXL_ADD_EMBEDDING
    assert shapes(unet) == {k: v for k, v in ref_shapes.items() if k not in add_embedding}
    assert count(unet) == SDXL_PARAMETERS - SDXL_ADD_EMBEDDING == 2_562_218_244
    # 64-wide heads, 10 and 20 of them: the old preset built 64 heads of width 10 and 20.
    assert head_layout(unet) == head_layout(reference) == {(10, 64), (20, 64)}
    assert unet.config.sample_size == 128 and unet.config.use_linear_projection
    # What the preset builds with the encoder it names (CLIP ViT-bigG/14, 1280 wide): only the
    # cross-attention key and value projections are narrower, in 10 transformer layers of 640
    # channels and 60 of 1280.
    narrower = meta_preset("sdxl", 1280)
    assert count(narrower) == 2_562_218_244 - 2 * (10 * 640 + 60 * 1280) * (2048 - 1280) == 2_434_423_044


def test_small_is_about_100m_and_tiny_and_shapes_are_what_they_say():
    small = count(meta_preset("small", MINILM_WIDTH))
    assert small == 100_105_604 and abs(small - 100e6) < 0.1 * 100e6
    assert count(meta_preset("tiny", MINILM_WIDTH)) == 6_285_572
    shapes_unet = meta_preset("shapes", MINILM_WIDTH)  # the demo's: 8x8x8 latents of its 32px VAE
    assert count(shapes_unet) == 4_648_072 and shapes_unet.config.sample_size == 8
    assert shapes_unet.config.in_channels == 8


def test_presets_follow_the_diffusers_head_naming():
    """Our num_attention_heads is diffusers' attention_head_dim; our attention_head_dim is a width."""
    base = {"block_out_channels": [64, 128], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    assert config_from_dict({"model": {"unet": base}}).model.unet.heads_per_level() == [8, 8]
    assert config_from_dict({"model": {"unet": {**base, "num_attention_heads": [2, 4]}}}).model.unet \
        .heads_per_level() == [2, 4]
    assert config_from_dict({"model": {"unet": {**base, "attention_head_dim": 32}}}).model.unet \
        .heads_per_level() == [2, 4]


@pytest.mark.parametrize("unet, message", [
    ({"num_attention_heads": 8, "attention_head_dim": 64}, "only one of the two"),
    ({"attention_head_dim": 48}, "`model.unet.attention_head_dim` must be a divisor of each level's channels"),
    ({"num_attention_heads": [8, 8]}, "`model.unet.num_attention_heads` must be null, a positive integer or a list "
                                      "of 3"),
    ({"attention_head_dim": 0}, "`model.unet.attention_head_dim` must be null, a positive integer"),
    ({"cross_attention_dim": 0}, "`model.unet.cross_attention_dim` must be null or >= 1"),
    ({"in_channels": 8}, "`model.unet.in_channels` must be null or model.vae.latent_channels (4)"),
])
def test_bad_unet_shapes_name_the_key(unet, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"unet": unet}})
    assert message in str(err.value)


def test_unknown_preset_lists_the_known_ones():
    presets = "sd15, sdxl, shapes, shapes-vae, small, tiny"
    with pytest.raises(ConfigError, match=f"config file sd3 does not exist .presets: {presets}"):
        load_config("sd3")
