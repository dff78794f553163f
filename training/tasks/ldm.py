"""The `ldm` task (`ldmflow train`): the latent diffusion UNet, against a frozen VAE and text encoder.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from training.checkpoint.layout import UNET_FILE
from training.config import RunConfig
from training.loader.batch import Batch, to_model_input
from training.loader.latents import sample_moments
from training.models.assembly import frozen_hashes
from training.models.sampling import build_scheduler, generate_images, image_grid
from training.tasks.base import VALIDATION_BATCH
from training.tasks.diffusion_loss import ObjectiveOptions, diffusion_loss, drop_captions, encode_latents, kept_captions


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
        self.cache = EncodingCache(max_bytes=int(cfg.train.cache_encodings_max_gb * 2**30)) \
            if cfg.train.cache_encodings else None
        self._pipeline = None

    def frozen_hashes(self) -> dict[str, str]:

        return frozen_hashes(self.parts.vae, self.parts.text)

    def loss(self, engine, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        if batch.latents is not None:
            return self.loss_from_latents(engine, batch, generator)
        captions = drop_captions(batch.captions, self.cfg.train.caption_dropout, generator)
        latents = self.latents(batch, generator)
        text_states = self.text_states(captions)
        # fp32 latents: diffusion_loss noises them in fp32 and casts only the UNet's input to its dtype.
        return diffusion_loss(engine, self.parts.noise_scheduler, latents, text_states, generator, options=self.options)

    def loss_from_latents(self, engine, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The same loss from a latent dataset's batch (`ldmflow encode`): neither frozen encoder runs. The
        generator's draws are the pixel path's, in its order (caption dropout, the posterior sample, then
        the loss's own), so the same seed gives the same loss up to the latents' fp16 storage."""
        kept = kept_captions(len(batch.keys), self.cfg.train.caption_dropout, generator)
        states = batch.text_states.float()
        if not bool(kept.all()):
            states = torch.where(kept[:, None, None], states, batch.empty_text.float()[None])
        latents = sample_moments(batch.latents, generator).to(self.device)
        return diffusion_loss(engine, self.parts.noise_scheduler, latents, states.to(self.device), generator,
                              options=self.options)

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
        for start in range(0, len(held_out.keys), VALIDATION_BATCH):
            part = slice(start, start + VALIDATION_BATCH)
            if held_out.latents is not None:  # a latent dataset: its stored (scaled) posterior mean
                latents = held_out.latents[part].float().chunk(2, dim=1)[0].to(self.device)
                states = held_out.text_states[part].float().to(self.device)
            else:
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

        # The modules themselves, not copies: the pipeline sees the weights as they are now.
        scheduler = build_scheduler(self.cfg.tracking.sampler, self.parts.noise_scheduler.config)
        pipe = StableDiffusionPipeline(vae=self.parts.vae, text_encoder=self.parts.text.model,
                                       tokenizer=self.parts.text.tokenizer, unet=module, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    return posterior.mean, posterior.std


class EncodingCache:
    """Per-worker memory of what the frozen encoders computed: the VAE posterior (mean, std) of each
    sample by key and the text states of each caption. Both encoders are frozen and the images are
    not augmented, so a cached encoding is exactly what encoding again would give. Bounded by
    `max_bytes`: past it, the entries used longest ago go first."""

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._moments: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._text: OrderedDict[str, torch.Tensor] = OrderedDict()

    def moments(self, batch: Batch, encode) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [i for i, key in enumerate(batch.keys) if key not in self._moments]
        fresh = {}
        if missing:
            mean, std = encode(batch.pixels[missing])
            fresh = {batch.keys[i]: (mean[j].float().cpu(), std[j].float().cpu()) for j, i in enumerate(missing)}
        out = [fresh.get(key) or self._moments[key] for key in batch.keys]
        for key in batch.keys:
            self._keep(self._moments, key, fresh.get(key))
        means, stds = zip(*out)
        return torch.stack(means), torch.stack(stds)

    def text(self, captions: list[str], encode) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self._text})
        fresh = dict(zip(missing, (s.float().cpu() for s in encode(missing)))) if missing else {}
        out = [fresh[c] if c in fresh else self._text[c] for c in captions]
        for caption in captions:
            self._keep(self._text, caption, fresh.get(caption))
        return torch.stack(out)

    def _keep(self, table: OrderedDict, key: str, new) -> None:
        """Store `new` under `key` (or mark the cached one used), then evict past max_bytes."""
        if new is not None and key not in table:
            table[key] = new
            self.bytes += _nbytes(new)
        elif key in table:
            table.move_to_end(key)
        while self.bytes > self.max_bytes and (self._moments or self._text):
            # The older of the two tables' least recently used entries is unknowable cheaply; samples
            # are the big ones, so they go first.
            victim = self._moments if self._moments else self._text
            _, value = victim.popitem(last=False)
            self.bytes -= _nbytes(value)

    def __len__(self) -> int:
        return len(self._moments)


def _nbytes(value) -> int:
    tensors = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors)
