"""The latent diffusion training objective (DDPM noise prediction, as in Stable Diffusion).

What the noise schedule defines (betas, prediction type, zero terminal SNR) comes with the
DDPMScheduler built from `model.scheduler`; the options of the loss itself (min-SNR weighting,
timestep sampling, noise offset) come from `train` as an :class:`ObjectiveOptions`. Caption dropout
acts on the captions before they are encoded (:func:`drop_captions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler

from training.config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class ObjectiveOptions:
    snr_gamma: float | None = None
    """Min-SNR-gamma weighting of each sample's loss; None: unweighted (train.snr_gamma)."""
    noise_offset: float = 0.0
    """Scale of the per-(sample, channel) offset added to the noise (train.noise_offset)."""
    timestep_sampling: str = "uniform"
    """`uniform` or `logit_normal` (train.timestep_sampling), with timestep_mean and timestep_std."""
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    channels_last: bool = False
    """The UNet's noisy input in torch.channels_last layout (train.speed.channels_last): a speed
    switch, the values are the same."""

    @classmethod
    def from_train(cls, train: TrainConfig) -> ObjectiveOptions:
        return cls(snr_gamma=train.snr_gamma, noise_offset=train.noise_offset,
                   timestep_sampling=train.timestep_sampling, timestep_mean=train.timestep_mean,
                   timestep_std=train.timestep_std, channels_last=train.speed.channels_last)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents sampled from the VAE posterior."""
    posterior = vae.encode(pixels).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype).to(pixels.device)
    latents = posterior.mean + posterior.std * noise
    return latents * vae.config.scaling_factor


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace captions by "" with probability p, so the model also learns the unconditional score
    that classifier-free guidance subtracts at sampling time."""
    if p <= 0:
        return captions
    keep = kept_captions(len(captions), p, generator)
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def kept_captions(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which of n captions caption dropout keeps (bool (n,)); the one draw drop_captions makes, none for p <= 0."""
    if p <= 0:
        return torch.ones(n, dtype=torch.bool)
    return torch.rand(n, generator=generator) >= p


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep, in fp32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, as in diffusers' train_text_to_image.py): min(SNR, gamma)
    is the weight of the x0 error; dividing by what the prediction's MSE already weighs it by
    (SNR for epsilon, SNR + 1 for v) gives the weight of that MSE."""
    ratio = snr(scheduler, timesteps)
    clipped = ratio.clamp(max=gamma)
    if scheduler.config.prediction_type == "epsilon":
        return clipped / ratio
    return clipped / (ratio + 1.0)


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator,
                     options: ObjectiveOptions) -> torch.Tensor:
    """`n` training timesteps in 0..T-1 drawn from `generator`: uniform, or logit-normal
    (T * sigmoid(mean + std * N(0, 1)), floored)."""
    if options.timestep_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    logits = options.timestep_mean + options.timestep_std * torch.randn(n, generator=generator)
    return (torch.sigmoid(logits) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def diffusion_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                   text_states: torch.Tensor, generator: torch.Generator, *,
                   options: ObjectiveOptions | None = None, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and the target of the scheduler's prediction type, each
    sample weighted by min-SNR-gamma when options.snr_gamma is set.

    Noise, timesteps and (if not given) the noise offset are drawn from `generator`. Given
    `timesteps` or `noise` (validation at fixed timesteps and noise) are used as they are, the
    noise without an offset. Everything up to the UNet's input runs in fp32, whatever the UNet's
    dtype: in bf16 the noise added at small t would be quantised by ~10% of its size, so the
    target would not be the noise in the input. Only the UNet's inputs are cast to its dtype, and
    the loss is computed in fp32.
    """
    options = options or ObjectiveOptions()
    latents = latents.float()
    b, c = latents.shape[:2]

    # --- noise, timesteps, noisy input: fp32 ---
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
        if options.noise_offset > 0:
            # One offset per (sample, channel), constant over H and W (the "offset noise" of
            # Guttenberg 2023, as in diffusers' scripts): the mean of a noised image drifts too.
            offset = torch.randn((b, c, 1, 1), generator=generator, dtype=torch.float32).to(latents.device)
            noise = noise + options.noise_offset * offset
    noise = noise.float()
    if timesteps is None:
        timesteps = sample_timesteps(b, scheduler.config.num_train_timesteps, generator, options)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    # --- target and weighting: fp32 ---
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    weights = None
    if options.snr_gamma is not None:
        weights = min_snr_weights(scheduler, timesteps, options.snr_gamma)

    # --- prediction in the UNet's dtype, loss in fp32 ---
    dtype = next(unet.parameters()).dtype
    noisy = noisy.to(dtype)
    if options.channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    prediction = unet(noisy, timesteps, text_states.to(dtype)).sample.float()
    per_sample = (prediction - target).square().mean(dim=tuple(range(1, prediction.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
