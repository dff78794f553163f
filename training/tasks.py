"""What a run trains: the two tasks of the one training loop in training/worker.py.

The loop (DeepSpeed engine, data streams, checkpoints, restarts, metrics) is the same for both; a
task decides what is built, what the loss of a batch is, how held-out samples are scored and which
file the final weights go to:

- `ldm` (`ldmflow train`): the latent diffusion UNet, against a frozen VAE and text encoder.
- `vae` (`ldmflow train-vae`): the first-stage AutoencoderKL itself, on reconstruction + KL.
"""

from __future__ import annotations

import numpy as np
import torch

from training.checkpointing import UNET_FILE, VAE_FILE
from training.config import RunConfig
from training.objective import ObjectiveOptions, diffusion_loss, drop_captions, encode_latents
from training.shard_loader import Batch, to_model_input


def build_task(cfg: RunConfig, *, seed: int, device: torch.device) -> LatentDiffusionTask | AutoencoderTask:
    if cfg.task == "vae":
        return AutoencoderTask(cfg, seed=seed, device=device)
    from training.models import build_components

    return LatentDiffusionTask(cfg, build_components(cfg.model, seed=seed), device=device)


def frozen_hashes_for(cfg: RunConfig) -> dict[str, str]:
    """sha256 of the frozen components the run's workers must all hold (driver side, before launch);
    loading them also checks every model path and shape (models.build_frozen)."""
    if cfg.task == "vae":
        return {}  # the VAE task freezes nothing
    from training.models import build_frozen, frozen_hashes

    vae, text = build_frozen(cfg.model)
    return frozen_hashes(vae, text)


class LatentDiffusionTask:
    """Denoising loss of the UNet on latents of the frozen VAE, conditioned on the frozen text encoder."""

    name = "ldm"
    weights_file = UNET_FILE

    def __init__(self, cfg: RunConfig, parts, *, device: torch.device):
        """`parts`: the models.Components of `cfg.model`; the frozen ones move to `device`."""
        self.cfg = cfg
        self.parts = parts
        self.parts.vae.to(device)
        self.parts.text.model.to(device)
        self.module = self.parts.unet
        self.device = device
        self.options = ObjectiveOptions.from_train(cfg.train)
        self.cache = EncodingCache() if cfg.train.cache_encodings else None
        self._pipeline = None

    def frozen_hashes(self) -> dict[str, str]:
        from training.models import frozen_hashes

        return frozen_hashes(self.parts.vae, self.parts.text)

    def loss(self, engine, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        captions = drop_captions(batch.captions, self.cfg.train.caption_dropout, generator)
        latents = self.latents(batch, generator)
        text_states = self.text_states(captions)
        # fp32 latents: diffusion_loss noises them in fp32 and casts only the UNet's input to its dtype.
        return diffusion_loss(engine, self.parts.noise_scheduler, latents, text_states, generator, options=self.options)

    def latents(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        vae = self.parts.vae
        if self.cache is None:
            return encode_latents(vae, to_model_input(batch.pixels, self.device), generator)
        mean, std = self.cache.moments(batch, lambda pixels: _posterior(vae, to_model_input(pixels, self.device)))
        # The same draw as encode_latents: a fresh sample of the cached posterior each time it is used.
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return ((mean + std * noise) * vae.config.scaling_factor).to(self.device)

    def text_states(self, captions: list[str]) -> torch.Tensor:
        if self.cache is None:
            return self.parts.text.encode(captions, self.device)
        return self.cache.text(captions, lambda missing: self.parts.text.encode(missing, self.device)).to(self.device)

    @torch.no_grad()
    def validate(self, module: torch.nn.Module, held_out: Batch) -> dict[str, float]:
        """Loss of `module` on the held-out samples at each of validation.timesteps, with noise fixed
        by validation.seed and latents from the posterior mean: the same inputs at every validation of
        every run of this config, so the curves compare."""
        v = self.cfg.validation
        scheduler = self.parts.noise_scheduler
        vae = self.parts.vae
        generator = torch.Generator().manual_seed(v.seed)
        metrics: dict[str, float] = {}
        total = 0.0
        for start in range(0, len(held_out.keys), _VALIDATION_BATCH):
            part = slice(start, start + _VALIDATION_BATCH)
            pixels = to_model_input(held_out.pixels[part], self.device)
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
            states = self.parts.text.encode(held_out.captions[part], self.device)
            for t in v.timesteps:
                noise = torch.randn(latents.shape, generator=generator).to(self.device)
                timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
                loss = float(diffusion_loss(module, scheduler, latents, states, generator, timesteps=timesteps,
                                            noise=noise)) * latents.shape[0]
                metrics[f"val_loss_t{t}"] = metrics.get(f"val_loss_t{t}", 0.0) + loss
                total += loss
        n = len(held_out.keys)
        metrics = {k: value / n for k, value in metrics.items()}
        metrics["val_loss"] = total / (n * len(v.timesteps))
        return metrics

    @torch.no_grad()
    def sample_grid(self, module: torch.nn.Module) -> np.ndarray:
        """tracking.sample_prompts drawn by `module` from latents fixed by validation.seed (with
        tracking's sampler, steps and guidance): one image per prompt, as one uint8 grid."""
        from training.pyfunc_model import generate_images
        from training.sampling import image_grid

        pipe = self._sampling_pipeline(module)
        tracking = self.cfg.tracking
        # A bf16/fp16 UNet (the GPU presets) is fed the fp32 text states of the frozen encoder: autocast
        # runs each op in the UNet's dtype, as the training loss casts its inputs.
        dtype = next(module.parameters()).dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            images = generate_images(pipe, tracking.sample_prompts, steps=tracking.sample_steps,
                                     guidance=tracking.guidance, seed=self.cfg.validation.seed)
        return image_grid(images, columns=len(images))

    def _sampling_pipeline(self, module: torch.nn.Module):
        from diffusers import StableDiffusionPipeline

        from training.samplers import build_scheduler

        # The modules themselves, not copies: the pipeline sees the weights as they are now.
        scheduler = build_scheduler(self.cfg.tracking.sampler, self.parts.noise_scheduler.config)
        pipe = StableDiffusionPipeline(vae=self.parts.vae, text_encoder=self.parts.text.model,
                                       tokenizer=self.parts.text.tokenizer, unet=module, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


_VALIDATION_BATCH = 32


def _posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    return posterior.mean, posterior.std


class EncodingCache:
    """Per-worker memory of what the frozen encoders computed: the VAE posterior (mean, std) of each
    sample by key and the text states of each caption. Both encoders are frozen and the images are
    not augmented, so a cached encoding is exactly what encoding again would give."""

    def __init__(self) -> None:
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text: dict[str, torch.Tensor] = {}

    def moments(self, batch: Batch, encode) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [i for i, key in enumerate(batch.keys) if key not in self._moments]
        if missing:
            mean, std = encode(batch.pixels[missing])
            for j, i in enumerate(missing):
                self._moments[batch.keys[i]] = (mean[j].float().cpu(), std[j].float().cpu())
        means, stds = zip(*(self._moments[key] for key in batch.keys))
        return torch.stack(means), torch.stack(stds)

    def text(self, captions: list[str], encode) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self._text})
        if missing:
            for caption, states in zip(missing, encode(missing)):
                self._text[caption] = states.float().cpu()
        return torch.stack([self._text[c] for c in captions])

    def __len__(self) -> int:
        return len(self._moments)


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

    def __init__(self, cfg: RunConfig, *, seed: int, device: torch.device):
        from training.models import new_vae

        self.cfg = cfg
        self.device = device
        vae = new_vae(cfg.model.vae, resolution=cfg.model.resolution, seed=seed)
        self.module = AutoencoderObjective(vae.requires_grad_(True).train())

    def frozen_hashes(self) -> dict[str, str]:
        return {}

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        from training.models import vae_downsample_factor

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
    for start in range(0, len(held_out.keys), _VALIDATION_BATCH):
        pixels = to_model_input(held_out.pixels[start:start + _VALIDATION_BATCH], device)
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
