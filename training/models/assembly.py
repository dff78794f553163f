"""Model assembly: the diffusers UNet being trained and its frozen partners (VAE, text encoder).

Components are either loaded from a path/hub id (real runs) or built from the config with a fixed
seed, so every Ray worker and the exporting driver hold bit-identical frozen weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from training.config import ModelConfig, UNetConfig, VAEConfig
from training.errors import ConfigError
from training.models.folders import ModelPathError, locate
from training.models.noise import build_noise_scheduler
from training.models.text_encoder import TextEncoder, load_text_encoder, locate_encoder, module_sha256

SD_SCALING_FACTOR = 0.18215
"""Latent scaling of a VAE built from config when model.vae.scaling_factor is null (SD 1.x's)."""


def build_unet(cfg: UNetConfig, *, sample_size: int, in_channels: int, cross_attention_dim: int,
               seed: int, init=None) -> UNet2DConditionModel:
    """A new UNet from the config (seeded), or the pretrained one it names. `in_channels` and
    `cross_attention_dim` are the loaded VAE's latent channels and text encoder's width: a new UNet
    is shaped for them, a pretrained one was checked against them (check_compatible). `init`: the
    context it is built in (deepspeed.zero.Init: a pretrained one is then loaded partition-wise)."""
    if init is None:
        init = contextlib.nullcontext()
    elif cfg.pretrained:
        return _pretrained_partitioned(cfg.pretrained, init, sample_size=sample_size)
    with init:
        return _build_unet(cfg, sample_size=sample_size, in_channels=in_channels,
                           cross_attention_dim=cross_attention_dim, seed=seed)


def _pretrained_partitioned(name: str, init, *, sample_size: int) -> UNet2DConditionModel:
    from training.models.partitioned_load import load_into_partitions, weight_files

    key = "model.unet.pretrained"
    location = locate(name, "unet", key, expected_class=UNet2DConditionModel.__name__)
    files = weight_files(location.folder, key)  # before anything is built: a folder without safetensors fails here
    config = dict(UNet2DConditionModel.load_config(location.path, subfolder=location.subfolder))
    config["sample_size"] = sample_size  # as below: the exported pipeline's default size
    with init:
        unet = UNet2DConditionModel.from_config(config)
    load_into_partitions(unet, files, key)
    return unet


def _build_unet(cfg: UNetConfig, *, sample_size: int, in_channels: int, cross_attention_dim: int,
                seed: int) -> UNet2DConditionModel:
    if cfg.pretrained:
        unet = _from_pretrained(UNet2DConditionModel, cfg.pretrained, "unet", "model.unet.pretrained")
        # Only metadata (a pipeline's default image size), but the exported pipeline should
        # generate at the resolution it was fine-tuned at.
        unet.register_to_config(sample_size=sample_size)
        return unet
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
            # diffusers' name for the number of heads (huggingface/diffusers#2011); its
            # `num_attention_heads` argument is refused by UNet2DConditionModel.
            attention_head_dim=tuple(cfg.heads_per_level()),
            use_linear_projection=cfg.use_linear_projection,
            norm_num_groups=cfg.norm_num_groups,
            **extra,
        )


def build_vae(cfg: VAEConfig, *, resolution: int) -> AutoencoderKL:
    """The frozen VAE of an `ldm` run: the pretrained one it names, or one built from its shape
    fields with model.vae.seed (random: only good for tests)."""
    if cfg.pretrained:
        vae = _from_pretrained(AutoencoderKL, cfg.pretrained, "vae", "model.vae.pretrained")
        if cfg.scaling_factor is not None:
            vae.register_to_config(scaling_factor=cfg.scaling_factor)
    else:
        vae = new_vae(cfg, resolution=resolution, seed=cfg.seed)
    vae.requires_grad_(False)
    vae.eval()
    return vae


def new_vae(cfg: VAEConfig, *, resolution: int, seed: int) -> AutoencoderKL:
    """An AutoencoderKL of the config's shape, initialised from `seed` (what `train-vae` trains)."""
    n = len(cfg.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            sample_size=resolution,
            scaling_factor=SD_SCALING_FACTOR if cfg.scaling_factor is None else cfg.scaling_factor,
        )


def configured_scaling_factor(cfg: VAEConfig) -> float:
    """The latent scaling factor the VAE of `cfg` will have (build_vae), read without loading weights:
    model.vae.scaling_factor, else a pretrained folder's own, else SD_SCALING_FACTOR."""
    if cfg.scaling_factor is not None:
        return float(cfg.scaling_factor)
    if cfg.pretrained:
        location = locate(cfg.pretrained, "vae", "model.vae.pretrained", expected_class=AutoencoderKL.__name__)
        config = AutoencoderKL.load_config(location.path, subfolder=location.subfolder)
        return float(config.get("scaling_factor", SD_SCALING_FACTOR))
    return SD_SCALING_FACTOR


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent side: 2 per encoder level after the first, as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _from_pretrained(cls, name: str, component: str, key: str):
    location = locate(name, component, key, expected_class=cls.__name__)
    try:
        # fp32 whatever the folder stores (fp16 variants are common): DeepSpeed casts the trained UNet
        # to the training precision itself and keeps fp32 master weights; the VAE encodes in fp32.
        return cls.from_pretrained(location.path, subfolder=location.subfolder, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelPathError(f"config key `{key}`: {cls.__name__} could not be loaded from {location}: {e}") from None


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: TextEncoder
    noise_scheduler: DDPMScheduler


def build_frozen(cfg: ModelConfig) -> tuple[AutoencoderKL, TextEncoder]:
    """The VAE and text encoder, checked against each other and the UNet config (check_compatible):
    the driver calls this before any run starts, so a wrong path or shape fails there, once."""
    te = cfg.text_encoder
    # Every folder first (no weights read), so a wrong path is the first and only thing reported.
    locate_encoder(te.name_or_path, te.tokenizer)
    if cfg.vae.pretrained:
        locate(cfg.vae.pretrained, "vae", "model.vae.pretrained", expected_class=AutoencoderKL.__name__)
    unet_config(cfg.unet)
    text = load_text_encoder(te.name_or_path, te.max_length, tokenizer=te.tokenizer,
                             use_attention_mask=te.use_attention_mask)
    vae = build_vae(cfg.vae, resolution=cfg.resolution)
    check_compatible(cfg, vae, text)
    return vae, text


def frozen_hashes(vae: AutoencoderKL, text: TextEncoder) -> dict[str, str]:
    """sha256 of the frozen weights, compared by driver, workers and export to prove they agree."""
    return {"vae": module_sha256(vae), "text_encoder": module_sha256(text.model)}


def build_components(cfg: ModelConfig, *, seed: int, unet_init=None) -> Components:
    """The frozen VAE and text encoder, then the UNet; `unet_init` is a context the UNet alone is built
    in (training.runtime.engine.module_init: deepspeed.zero.Init under train.deepspeed.zero_init), so
    the frozen models stay whole on every rank, outside DeepSpeed."""
    vae, text = build_frozen(cfg)
    # The latent's side, channels and scale are the loaded VAE's (a pretrained one's own config),
    # never the VAE fields of the config, which describe only a VAE built from config.
    unet = build_unet(
        cfg.unet,
        sample_size=cfg.resolution // vae_downsample_factor(vae),
        in_channels=vae.config.latent_channels,
        cross_attention_dim=text.hidden_size,
        seed=seed,
        init=unet_init,
    )
    return Components(unet=unet, vae=vae, text=text, noise_scheduler=build_noise_scheduler(cfg.scheduler))


def unet_config(cfg: UNetConfig) -> dict | None:
    """A pretrained UNet's config.json (no weights read); None for a UNet built from config."""
    if not cfg.pretrained:
        return None
    location = locate(cfg.pretrained, "unet", "model.unet.pretrained", expected_class=UNet2DConditionModel.__name__)
    try:
        return dict(UNet2DConditionModel.load_config(location.path, subfolder=location.subfolder))
    except (OSError, ValueError) as e:
        raise ModelPathError(f"config key `model.unet.pretrained`: no UNet config at {location}: {e}") from None


def check_compatible(cfg: ModelConfig, vae: AutoencoderKL, text: TextEncoder) -> None:
    """The UNet (configured or pretrained) against the loaded VAE and text encoder: latent channels,
    text width and the resolution both downsample. Raises ConfigError naming the key to change."""
    pretrained = unet_config(cfg.unet)
    latent_channels = int(vae.config.latent_channels)
    vae_factor = vae_downsample_factor(vae)
    vae_name = cfg.vae.pretrained or "the VAE built from model.vae"
    width = text.hidden_size
    if cfg.unet.in_channels is not None and cfg.unet.in_channels != latent_channels:
        raise ConfigError(
            f"config key `model.unet.in_channels` is {cfg.unet.in_channels} but {vae_name} has {latent_channels} "
            "latent channels: use a VAE with that many, or set model.unet.in_channels to null (follow the VAE)"
        )
    if cfg.unet.cross_attention_dim is not None and cfg.unet.cross_attention_dim != width:
        raise ConfigError(
            f"config key `model.unet.cross_attention_dim` is {cfg.unet.cross_attention_dim} but the text encoder "
            f"{cfg.text_encoder.name_or_path} gives {width}-wide states: use the encoder the preset was made for, "
            "or set model.unet.cross_attention_dim to null (follow the encoder)"
        )
    if pretrained is not None:
        where = f"the UNet at {cfg.unet.pretrained}"
        latents = f"{vae_name} has {latent_channels} latent channels"
        for name, want, other in (("in_channels", latent_channels, latents),
                                  ("out_channels", latent_channels, latents),
                                  ("cross_attention_dim", width,
                                   f"the text encoder {cfg.text_encoder.name_or_path} gives {width}-wide states")):
            if pretrained.get(name) != want:
                raise ConfigError(
                    f"config key `model.unet.pretrained`: {where} has {name} {pretrained.get(name)}, but {other}: "
                    "pair it with the VAE and text encoder it was trained with"
                )
        for name in ("addition_embed_type", "class_embed_type"):
            if pretrained.get(name) is not None:
                # SDXL's micro-conditioning (text_time: pooled text + size/crop ids) and class labels
                # are extra inputs of the forward that the training loop does not provide.
                raise ConfigError(
                    f"config key `model.unet.pretrained`: {where} has {name}={pretrained[name]!r}, an extra "
                    "conditioning input this trainer does not feed; use a UNet without it"
                )
    levels = len(pretrained["block_out_channels"] if pretrained is not None else cfg.unet.block_out_channels)
    factor = vae_factor * 2 ** (levels - 1)
    if cfg.resolution % factor:
        raise ConfigError(
            f"config key `model.resolution` must be a multiple of {factor} ({vae_name} downsamples by {vae_factor}, "
            f"the UNet's {levels} levels by {2 ** (levels - 1)}), got {cfg.resolution}"
        )
