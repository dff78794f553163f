"""The `vae` task (`ldmflow train-vae`): the first-stage AutoencoderKL itself, on reconstruction + KL.
"""

from __future__ import annotations

import contextlib

import torch

from training.checkpoint.layout import VAE_FILE
from training.config import RunConfig
from training.loader.batch import Batch, to_model_input
from training.models.assembly import new_vae, vae_downsample_factor
from training.tasks.base import VALIDATION_BATCH


class AutoencoderObjective(torch.nn.Module):
    """The AutoencoderKL being trained, with a forward that returns what its loss needs. DeepSpeed
    wraps this module; the exported VAE is its `vae`."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor):
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


class AutoencoderTask:
    """Reconstruction MSE of the AutoencoderKL plus train.kl_weight x its KL to N(0, 1), each a mean
    per element; validation scores held-out reconstructions (from the posterior mean) in PSNR."""

    name = "vae"
    weights_file = VAE_FILE

    def __init__(self, cfg: RunConfig, *, seed: int, device: torch.device, module_init=None):
        """`module_init`: the context the trained AutoencoderKL is built in (deepspeed.zero.Init), if any."""
        self.cfg = cfg
        self.device = device
        with module_init if module_init is not None else contextlib.nullcontext():
            vae = new_vae(cfg.model.vae, resolution=cfg.model.resolution, seed=seed)
            self.module = AutoencoderObjective(vae.requires_grad_(True).train())

    def frozen_hashes(self) -> dict[str, str]:
        return {}

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:

        vae = self.module.vae
        side = self.cfg.model.resolution // vae_downsample_factor(vae)
        return (batch_size, vae.config.latent_channels, side, side)

    def loss(self, engine, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        dtype = next(engine.parameters()).dtype
        pixels = to_model_input(batch.pixels, self.device)
        noise = torch.randn(self.latent_shape(len(batch.keys)), generator=generator).to(self.device)
        recon, mean, logvar = engine(pixels.to(dtype), noise.to(dtype))
        return autoencoder_loss(pixels, recon, mean, logvar, self.cfg.train.kl_weight)

    def validate(self, module: torch.nn.Module, held_out: Batch) -> dict[str, float]:
        return reconstruction_metrics(module.vae, held_out, self.device)

    def sample_grid(self, module: torch.nn.Module) -> None:
        return None  # the reconstructions are scored by PSNR; nothing is sampled


@torch.no_grad()
def reconstruction_metrics(vae, held_out: Batch, device: torch.device | str) -> dict[str, float]:
    """Mean PSNR (dB), MSE and KL of `vae` on held-out images, reconstructed from the posterior mean."""
    squared, kl, n = 0.0, 0.0, 0
    psnrs: list[float] = []
    dtype = next(vae.parameters()).dtype
    for start in range(0, len(held_out.keys), VALIDATION_BATCH):
        pixels = to_model_input(held_out.pixels[start:start + VALIDATION_BATCH], device)
        posterior = vae.encode(pixels.to(dtype)).latent_dist
        recon = vae.decode(posterior.mean).sample.float()
        psnrs.extend(psnr(pixels, recon).tolist())
        squared += float((recon - pixels).square().mean()) * len(pixels)
        kl += float(kl_per_element(posterior.mean.float(), posterior.logvar.float())) * len(pixels)
        n += len(pixels)
    return {"val_psnr": sum(psnrs) / len(psnrs), "val_mse": squared / n, "val_kl": kl / n}


def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every latent value."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def autoencoder_loss(pixels: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                     kl_weight: float) -> torch.Tensor:
    """MSE per pixel value + kl_weight x KL per latent value, in fp32."""
    mse = (recon.float() - pixels.float()).square().mean()
    return mse + kl_weight * kl_per_element(mean.float(), logvar.float())


def psnr(pixels: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of a reconstruction, both in [-1, 1] (recon clamped, as it is displayed);
    the peak is the [-1, 1] range's 2."""
    mse = (recon.clamp(-1, 1).float() - pixels.float()).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10.0 * torch.log10(4.0 / mse)
