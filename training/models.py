"""Model assembly: the diffusers UNet being trained and its frozen partners (VAE, text encoder).

Components are either loaded from a path/hub id (real runs) or built from the config with a fixed
seed, so every Ray worker and the exporting driver hold bit-identical frozen weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from training.config import ModelConfig, NoiseSchedulerConfig, UNetConfig, VAEConfig
from training.text_encoder import TextEncoder, load_text_encoder, module_sha256


def build_unet(cfg: UNetConfig, *, sample_size: int, in_channels: int, cross_attention_dim: int,
               seed: int) -> UNet2DConditionModel:
    if cfg.pretrained:
        return UNet2DConditionModel.from_pretrained(cfg.pretrained, subfolder=_subfolder(cfg.pretrained, "unet"))
    extra = {}
    if cfg.transformer_layers_per_block is not None:
        extra["transformer_layers_per_block"] = tuple(cfg.transformer_layers_per_block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            layers_per_block=cfg.layers_per_block,
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=tuple(cfg.down_block_types),
            up_block_types=tuple(cfg.up_block_types),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
            **extra,
        )


def build_vae(cfg: VAEConfig, *, resolution: int) -> AutoencoderKL:
    if cfg.pretrained:
        vae = AutoencoderKL.from_pretrained(cfg.pretrained, subfolder=_subfolder(cfg.pretrained, "vae"))
    else:
        n = len(cfg.block_out_channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block,
                latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.norm_num_groups,
                sample_size=resolution,
                scaling_factor=cfg.scaling_factor,
            )
    vae.requires_grad_(False)
    vae.eval()
    return vae


def build_noise_scheduler(cfg: NoiseSchedulerConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM over the training schedule: the same model, a few dozen steps instead of a thousand."""
    return DDIMScheduler.from_config(train_scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: TextEncoder
    noise_scheduler: DDPMScheduler


def build_frozen(cfg: ModelConfig) -> tuple[AutoencoderKL, TextEncoder]:
    text = load_text_encoder(cfg.text_encoder.name_or_path, cfg.text_encoder.max_length)
    vae = build_vae(cfg.vae, resolution=cfg.resolution)
    return vae, text


def frozen_hashes(vae: AutoencoderKL, text: TextEncoder) -> dict[str, str]:
    """sha256 of the frozen weights, compared by driver, workers and export to prove they agree."""
    return {"vae": module_sha256(vae), "text_encoder": module_sha256(text.model)}


def build_components(cfg: ModelConfig, *, seed: int) -> Components:
    vae, text = build_frozen(cfg)
    unet = build_unet(
        cfg.unet,
        sample_size=cfg.latent_size,
        in_channels=vae.config.latent_channels,
        cross_attention_dim=text.hidden_size,
        seed=seed,
    )
    if unet.config.cross_attention_dim != text.hidden_size:
        raise ValueError(
            f"UNet cross_attention_dim {unet.config.cross_attention_dim} != text encoder hidden size "
            f"{text.hidden_size}: pick a UNet trained for this encoder (model.unet.pretrained)"
        )
    return Components(unet=unet, vae=vae, text=text, noise_scheduler=build_noise_scheduler(cfg.scheduler))


def _subfolder(path: str, name: str) -> str | None:
    """Accept both a component folder and a whole pipeline folder holding it as a subfolder."""
    p = Path(path)
    return name if (p / name / "config.json").is_file() else None
