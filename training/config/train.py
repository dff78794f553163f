"""The `train`, `validation` and `tracking` sections of a run config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.config.checks import check_key
from training.config.deepspeed import DeepSpeedConfig, check_deepspeed_section
from training.config.speed import SpeedConfig, check_speed_section
from training.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


LR_SCHEDULES = ("constant", "cosine")


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


CHECKPOINT_UPLOADS = ("async", "sync")
ELASTIC_BATCHES = ("global", "per_worker")


@dataclass(kw_only=True)
class EMAConfig:
    enabled: bool = True
    """Keep an exponential moving average of the UNet; the exported model uses it."""
    decay: float = 0.999
    """Upper bound of the EMA decay; early steps use (1+step)/(10+step), as diffusers does."""

    def __post_init__(self) -> None:
        check_key(0.0 < self.decay < 1.0, "train.ema.decay", "in (0, 1)", self.decay)


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps to run in total (across resumes)."""
    batch_size: int = 8
    """Micro-batch per worker; the global batch is batch_size * grad_accum * num_workers."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (on train.num_workers workers; see elastic_batch)."""
    elastic_batch: str = "global"
    """When the run trains on another number of workers than it was configured or checkpointed with
    (an elastic group that lost a node, `--resume --num-workers M`): `global` keeps the global batch,
    and so the meaning of lr and steps, by changing each worker's accumulation (refused when the new
    count does not divide it); `per_worker` keeps batch_size x grad_accum per worker, the global batch
    follows the worker count, and the change is logged (lr is kept as it is: no scaling rule)."""
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
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed's memory options (offload, activation checkpointing, zero.Init) and any other key of
    its config (train.deepspeed.extra)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16. bf16/fp16 need train.use_gpu=true (or train.allow_cpu_half_precision)."""
    caption_dropout: float = 0.1
    """Probability a caption is replaced by the empty string, for classifier-free guidance."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023): each sample's loss is weighted by
    min(SNR(t), gamma) / SNR(t) for epsilon, / (SNR(t) + 1) for v_prediction; 5.0 is the paper's
    value. None: unweighted MSE."""
    timestep_sampling: str = "uniform"
    """How each sample's diffusion timestep is drawn: `uniform` over 0..T-1 (DDPM, Stable Diffusion)
    or `logit_normal`: t = T * sigmoid(timestep_mean + timestep_std * N(0, 1)), which spends more of
    the steps on the middle noise levels, where an image's layout is decided, and fewer on the
    nearly clean and nearly pure-noise ends (Esser et al. 2024, section 3.1, m=0 s=1)."""
    timestep_mean: float = 0.0
    """Location of logit_normal sampling on the logit scale: > 0 moves it towards noisier timesteps."""
    timestep_std: float = 1.0
    """Scale of logit_normal sampling on the logit scale (> 0): larger is closer to uniform at the
    middle, with more mass at the two ends."""
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
    max_pending_uploads: int = 2
    """async: checkpoints a rank may have waiting for their upload (each a local folder as large as its
    part). When storage is slower than train.checkpoint_every, the next checkpoint waits for one to
    finish, and says so, instead of piling folders up on local disk."""
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
    cache_encodings_max_gb: float = 4.0
    """The most memory (GiB, per worker) train.cache_encodings may hold; past it the encodings used
    longest ago are dropped (and computed again when their sample comes round)."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """Throughput switches (attention kernel, channels_last, TF32, torch.compile, fused AdamW): how fast
    a step runs, not what it computes (training.config.speed)."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "num_workers", "cpus_per_worker",
                    "log_every", "checkpoint_every", "checkpoints_to_keep"):
            check_key(getattr(self, key) >= 1, f"train.{key}", ">= 1", getattr(self, key))
        check_key(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "0-3", self.zero_stage)
        check_key(self.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}",
               self.precision)
        # Half precision is a GPU setting: without a GPU it is a forgotten train.use_gpu, unless the
        # run says it wants to exercise that path on CPU.
        if self.precision in ("bf16", "fp16") and not self.use_gpu and not self.allow_cpu_half_precision:
            raise ConfigError(
                f"config key `train.precision` is {self.precision} but `train.use_gpu` is false: "
                "set train.use_gpu=true for a GPU run, train.precision=fp32 for a CPU run, or "
                f"train.allow_cpu_half_precision=true to run {self.precision} on CPU on purpose"
            )
        check_key(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule",
               f"one of {', '.join(LR_SCHEDULES)}", self.lr_schedule)
        check_key(self.lr > 0, "train.lr", "> 0", self.lr)
        check_key(self.warmup_steps >= 0, "train.warmup_steps", ">= 0", self.warmup_steps)
        check_key(0.0 <= self.caption_dropout < 1.0, "train.caption_dropout", "in [0, 1)",
               self.caption_dropout)
        if self.snr_gamma is not None:
            check_key(self.snr_gamma > 0, "train.snr_gamma", "null or > 0 (5.0 is usual)", self.snr_gamma)
        check_key(self.timestep_sampling in TIMESTEP_SAMPLING, "train.timestep_sampling",
                  f"one of {', '.join(TIMESTEP_SAMPLING)}", self.timestep_sampling)
        check_key(self.timestep_std > 0, "train.timestep_std", "> 0 (1.0 is usual)", self.timestep_std)
        check_key(0.0 <= self.noise_offset <= 1.0, "train.noise_offset", "in [0, 1] (0.05-0.1 is usual)",
               self.noise_offset)
        check_key(self.kl_weight >= 0, "train.kl_weight", ">= 0", self.kl_weight)
        check_key(self.max_failures >= 0, "train.max_failures", ">= 0", self.max_failures)
        check_key(self.loader_workers >= 0, "train.loader_workers", ">= 0", self.loader_workers)
        check_key(self.cluster_wait_s >= 0, "train.cluster_wait_s", ">= 0", self.cluster_wait_s)
        check_key(self.cache_encodings_max_gb > 0, "train.cache_encodings_max_gb", "> 0", self.cache_encodings_max_gb)
        check_key(self.elastic_batch in ELASTIC_BATCHES, "train.elastic_batch", f"one of {', '.join(ELASTIC_BATCHES)}",
                  self.elastic_batch)
        check_key(self.max_pending_uploads >= 1, "train.max_pending_uploads", ">= 1", self.max_pending_uploads)
        check_key(self.checkpoint_upload in CHECKPOINT_UPLOADS, "train.checkpoint_upload",
               f"one of {', '.join(CHECKPOINT_UPLOADS)}", self.checkpoint_upload)
        if self.min_workers is not None:
            check_key(1 <= self.min_workers <= self.num_workers, "train.min_workers",
                   f"between 1 and train.num_workers ({self.num_workers})", self.min_workers)
        # ZeRO-3 partitions parameters across ranks, so no rank holds the full weights to average.
        check_key(not (self.ema.enabled and self.zero_stage == 3), "train.ema.enabled",
               "false when train.zero_stage is 3 (EMA needs full parameters on each rank)", True)
        check_deepspeed_section(self)
        check_speed_section(self)


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
        check_key(bool(self.model_name.strip()), "tracking.model_name", "a non-empty name", self.model_name)
        check_key(self.sample_steps >= 1, "tracking.sample_steps", ">= 1", self.sample_steps)
        check_key(self.sampler in ("ddim", "dpm++"), "tracking.sampler", "ddim or dpm++", self.sampler)
        check_key(self.guidance >= 1.0, "tracking.guidance", ">= 1 (1: no guidance)", self.guidance)


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
        check_key(0.0 <= self.holdout_fraction < 1.0, "validation.holdout_fraction", "in [0, 1)", self.holdout_fraction)
        check_key(self.every >= 0, "validation.every", ">= 0 (0: final step only)", self.every)
        check_key(self.max_samples >= 1, "validation.max_samples", ">= 1", self.max_samples)
        check_key(bool(self.timesteps) and all(t >= 0 for t in self.timesteps), "validation.timesteps",
               "a non-empty list of timesteps >= 0", self.timesteps)
