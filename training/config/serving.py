"""The `serving` section of a run config: the request limits the registered model enforces.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.config.checks import check_key


@dataclass(kw_only=True)
class ServingConfig:
    """What one request to the registered model (mlflow.pyfunc, `mlflow models serve`) may ask for.
    Written into the exported pipeline folder (serving_limits.json) and enforced in the model's
    predict: a request outside them is refused with a message naming the limit, before any work,
    instead of running the server out of memory."""

    max_prompts: int = 64
    """Prompts (images) one request may ask for. Above max_batch they are generated in several
    pipeline calls, so this bounds a request's time, not its memory."""
    max_batch: int = 8
    """Prompts per pipeline call: the UNet sees at most 2 x max_batch samples at once (classifier-free
    guidance doubles the batch). This, with the image size, bounds the memory of a request."""
    max_steps: int = 100
    """The most denoising steps a request may ask for."""
    min_guidance: float = 1.0
    """The smallest classifier-free guidance scale a request may ask for (1: guidance off)."""
    max_guidance: float = 20.0
    """The largest guidance scale a request may ask for; far above the trained range images saturate."""
    max_image_size: int | None = None
    """The largest height or width (pixels) a request may ask for with the `height`/`width` params.
    None: model.resolution, the size the model was trained at and the size a request that names
    none gets."""

    def __post_init__(self) -> None:
        for key in ("max_prompts", "max_batch", "max_steps"):
            check_key(getattr(self, key) >= 1, f"serving.{key}", ">= 1", getattr(self, key))
        check_key(self.min_guidance >= 1.0, "serving.min_guidance", ">= 1 (1: no guidance)", self.min_guidance)
        check_key(self.max_guidance >= self.min_guidance, "serving.max_guidance",
                  f">= serving.min_guidance ({self.min_guidance})", self.max_guidance)
        if self.max_image_size is not None:
            check_key(self.max_image_size >= 8 and self.max_image_size % 8 == 0, "serving.max_image_size",
                      "null or a multiple of 8 (the pipeline's size step)", self.max_image_size)
