"""The training noise schedule (DDPM, from `model.scheduler`) and the sampler an export saves over it."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

from training.config import NoiseSchedulerConfig
from training.models.sampling import build_scheduler


def build_noise_scheduler(cfg: NoiseSchedulerConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        clip_sample=False,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM over the training schedule, what the export saves as the pipeline's scheduler: the
    `ddim` sampler of training.models.sampling (trailing spacing for a zero-terminal-SNR schedule)."""
    return build_scheduler("ddim", train_scheduler.config)
