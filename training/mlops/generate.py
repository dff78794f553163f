"""Consuming a registered model: resolve its URI, load it through MLflow, generate, write PNGs.

A consumer names a model as ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``
or a local pipeline folder (with model_index.json). Whatever goes wrong before generation starts (a
malformed URI, an unknown name or alias, a tracking server that does not answer) is one
``ModelLoadError`` naming the model and the fix, never a traceback from inside MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import storage
from data_prep.image_ops import encode_image
from training.errors import ModelLoadError
from training.locations import setup_mlflow

URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a pipeline folder (with model_index.json)"

CONSUMER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
"""A consumer command asks the server a handful of small questions; with MLflow's defaults (7 retries,
back-off up to 120 s, 120 s per attempt) a server that is down answers only after minutes. These caps
(set only where the environment does not set them) make it answer in seconds."""


def bound_http_retries() -> None:
    for key, value in CONSUMER_HTTP_ENV.items():
        os.environ.setdefault(key, value)


def is_pipeline_folder(uri: str) -> bool:
    return "://" not in uri and ":/" not in uri and (Path(uri) / "model_index.json").is_file()


def check_uri(model_uri: str) -> None:
    """Refuse a URI of an unknown form before any server is asked."""
    if is_pipeline_folder(model_uri):
        return
    if model_uri.startswith("models:/"):
        ref = model_uri[len("models:/"):].strip("/")
        name, _, alias = ref.partition("@")
        if "@" in ref and name and alias and "/" not in alias:
            return
        parts = ref.split("/")
        if "@" not in ref and len(parts) == 2 and all(parts) and (parts[1].isdigit() or parts[1] == "latest"):
            return
    elif model_uri.startswith("runs:/"):
        parts = model_uri[len("runs:/"):].split("/", 1)
        if len(parts) == 2 and all(parts):
            return
    elif "://" not in model_uri and ":/" not in model_uri and Path(model_uri).is_dir():
        raise ModelLoadError(f"{model_uri} is a folder but not a pipeline folder: it has no model_index.json")
    raise ModelLoadError(f"model {model_uri!r} is not a model URI: give {URI_FORMS}")


def _explain(model_uri: str, e: BaseException) -> ModelLoadError:
    """One line for what MLflow raised while resolving or downloading `model_uri`."""
    from mlflow.exceptions import MlflowException

    server = os.environ.get("MLFLOW_TRACKING_URI", "the embedded store")
    text = e.message if isinstance(e, MlflowException) else str(e)
    code = getattr(e, "error_code", "")
    if "RESOURCE_DOES_NOT_EXIST" in code or "not found" in text.lower() or "does not exist" in text.lower():
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        return ModelLoadError(f"{model_uri}: not found on {server} ({first}); `ldmflow registry list` "
                              f"or the MLflow UI shows the registered names, versions and aliases")
    if isinstance(e, MlflowException) and ("Max retries" in text or "Connection" in text or "timed out" in text):
        return ModelLoadError(f"cannot reach the MLflow tracking server {server} to load {model_uri}: is it up? "
                              f"(MLFLOW_TRACKING_URI names it)")
    if isinstance(e, (OSError, ConnectionError)):
        return ModelLoadError(f"cannot reach the MLflow tracking server {server} to load {model_uri}: "
                              f"{type(e).__name__}: {e}")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return ModelLoadError(f"cannot load {model_uri} from MLflow: {first}")


Predict = Callable[[list[str], dict], np.ndarray]


def load_generator(model_uri: str) -> Predict:
    """predict(prompts, params) -> uint8 images (N, H, W, 3) for the model at `model_uri`; image i of a
    request starts from the noise of params["seed"] + i."""
    check_uri(model_uri)
    if is_pipeline_folder(model_uri):
        from types import SimpleNamespace

        from training.mlops.pyfunc_model import PIPELINE_ARTIFACT, TextToImageModel

        model = TextToImageModel()
        model.load_context(SimpleNamespace(artifacts={PIPELINE_ARTIFACT: str(model_uri)}, model_config=None))
        return lambda prompts, params: model.predict(None, prompts, params)
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    bound_http_retries()
    setup_mlflow()
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError, ConnectionError) as e:
        raise _explain(model_uri, e) from None
    return lambda prompts, params: loaded.predict(pd.DataFrame({"prompt": list(prompts)}), params=params)


def request_params(*, seed: int, sampler: str | None = None, steps: int | None = None,
                   guidance: float | None = None) -> dict:
    """The pyfunc params of a request; what is None is left out, so the model uses the sampler
    defaults its pipeline folder recorded."""
    given = {"sampler": sampler, "steps": steps, "guidance": guidance}
    return {"seed": seed, **{k: v for k, v in given.items() if v is not None}}


def png_bytes(image: np.ndarray) -> bytes:
    return encode_image(Image.fromarray(image), "png", 100)


def generate_from_registry(model_uri: str, prompt: str, out_dir: str | Path, *, n: int = 1, seed: int = 0,
                           steps: int | None = None, guidance: float | None = None,
                           sampler: str | None = None) -> list[str]:
    """Load `model_uri` (e.g. models:/ldm-tiny@champion) and write n PNGs to `out_dir` (a folder or an
    s3:// prefix), one batched request; steps, guidance and sampler left None take the model's
    recorded defaults."""
    check_uri(model_uri)
    # Checked before the (slow) model load; a local folder is made only once there are images for it.
    if storage.is_s3(out_dir):
        storage.storage_for(out_dir).check_writable(str(out_dir))
    elif Path(storage.local_path(out_dir)).is_file():
        raise ModelLoadError(f"--out {out_dir} is an existing file; give a folder")
    predict = load_generator(model_uri)
    images = predict([prompt] * n, request_params(seed=seed, sampler=sampler, steps=steps, guidance=guidance))
    if not storage.is_s3(out_dir):
        Path(storage.local_path(out_dir)).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = storage.join(out_dir, f"image-{seed + i:05d}.png")
        storage.put_bytes(path, png_bytes(image))
        paths.append(path)
    return paths
