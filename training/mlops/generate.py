"""Consuming a registered model: load it through MLflow, generate, write PNGs."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from data_prep import storage
from data_prep.image_ops import encode_image
from training.locations import setup_mlflow


def request_params(*, seed: int, sampler: str | None = None, steps: int | None = None,
                   guidance: float | None = None) -> dict:
    """The pyfunc params of a request; what is None is left out, so the model uses the sampler
    defaults its pipeline folder recorded."""
    given = {"sampler": sampler, "steps": steps, "guidance": guidance}
    return {"seed": seed, **{k: v for k, v in given.items() if v is not None}}


def generate_from_registry(model_uri: str, prompt: str, out_dir: str | Path, *, n: int = 1, seed: int = 0,
                           steps: int | None = None, guidance: float | None = None,
                           sampler: str | None = None) -> list[Path]:
    """Load `model_uri` (e.g. models:/ldm-tiny@candidate) as a pyfunc and write n PNGs, one batched
    request; steps, guidance and sampler left None take the model's recorded defaults."""
    import mlflow.pyfunc
    import pandas as pd

    out_dir = Path(storage.local_path(out_dir))  # checked before the (slow) model load
    setup_mlflow()
    model = mlflow.pyfunc.load_model(model_uri)
    images = model.predict(pd.DataFrame({"prompt": [prompt] * n}),
                           params=request_params(seed=seed, sampler=sampler, steps=steps, guidance=guidance))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"image-{seed + i:05d}.png"
        storage.put_bytes(path, encode_image(Image.fromarray(image), "png", 100))
        paths.append(path)
    return paths
