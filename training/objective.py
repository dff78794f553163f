"""The latent diffusion training objective (DDPM noise prediction, as in Stable Diffusion)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler


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
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def diffusion_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                   text_states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MSE between the UNet's prediction and the target of the configured prediction type."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, text_states).sample
    return F.mse_loss(prediction.float(), target.float())
