"""A tiny random text-to-image pipeline folder, as training.mlops.export writes one: the `tiny` preset's
components at 32 px (8x8 latents), untrained. Enough to exercise sampling, the pyfunc model and
evaluation in seconds; its images are noise-like, not shapes."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline

from training.config import load_config
from training.mlops.export import save_pipeline
from training.models.assembly import build_components
from training.models.noise import sampling_scheduler
from training.models.sampling import SamplerDefaults

ROOT = Path(__file__).resolve().parents[2]


def tiny_pipeline(overrides: tuple[str, ...] = ()) -> StableDiffusionPipeline:
    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.resolution=32", *overrides])
    parts = build_components(cfg.model, seed=cfg.train.seed)
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text.model, tokenizer=parts.text.tokenizer, unet=parts.unet.eval(),
        scheduler=sampling_scheduler(parts.noise_scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(out_dir: Path, defaults: SamplerDefaults | None = None) -> Path:
    return save_pipeline(tiny_pipeline(), out_dir, defaults)
