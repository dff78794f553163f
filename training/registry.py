"""Logging the exported pipeline as an MLflow model and registering it, idempotently.

MLflow's ``register_model`` always creates a new version, so a retried task would register the
same run twice. Here a run registers at most one version per model name: a retry finds it and
only re-applies tags and the alias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from training.samplers import SamplerDefaults, read_defaults

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
MODEL_ARTIFACT = "model"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def signature(defaults: SamplerDefaults | None = None):
    """Prompts in, uint8 images out; the params' defaults are the pipeline folder's recorded sampler
    defaults, because MLflow fills a param a request leaves out with its signature default before
    predict sees the request."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    defaults = defaults or SamplerDefaults()
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=ParamSchema([
            ParamSpec("sampler", "string", defaults.sampler),
            ParamSpec("steps", "long", defaults.steps),
            ParamSpec("guidance", "double", defaults.guidance),
            ParamSpec("seed", "long", 0),
        ]),
    )


def pip_requirements() -> list[str]:
    # Pinned from this environment; listing them explicitly skips MLflow's slow import capture.
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in
            ("mlflow", "diffusers", "transformers", "safetensors", "numpy", "pandas", "pillow")]
    return [f"torch=={version('torch').split('+')[0]}", *pins]


def find_version(client: MlflowClient, name: str, run_id: str) -> RegisteredVersion | None:
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.run_id == run_id:
            return RegisteredVersion(name=name, version=str(mv.version), run_id=run_id)
    return None


def register_pipeline(run_id: str, pipeline_dir: Path, name: str, tags: dict[str, str]) -> RegisteredVersion:
    """Log `pipeline_dir` as a pyfunc model of run `run_id`, register it under `name`, tag it and
    point the `candidate` alias at it."""
    client = MlflowClient()
    found = find_version(client, name, run_id)
    if found is None:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(PYFUNC_CODE),
                artifacts={"pipeline": str(pipeline_dir)},
                signature=signature(read_defaults(pipeline_dir)),
                pip_requirements=pip_requirements(),
            )
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
        found = RegisteredVersion(name=name, version=str(mv.version), run_id=run_id)
        log.info("registered %s version %s", name, found.version)
    else:
        log.info("run %s already registered %s version %s; re-applying tags", run_id, name, found.version)
    for key, value in tags.items():
        client.set_model_version_tag(name, found.version, key, value)
    client.set_registered_model_alias(name, CANDIDATE, found.version)
    return found
