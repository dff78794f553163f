"""Logging the exported pipeline as an MLflow model and registering it, idempotently.

MLflow's ``register_model`` always creates a new version, so a retried task would register the
same run twice. Here a run registers at most one version per model name: a retry finds it and
only re-applies tags and the alias.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from training.mlops import pyfunc_model
from training.models import sampling
from training.models.sampling import SamplerDefaults, read_defaults

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
MODEL_ARTIFACT = "model"
PYFUNC_CODE = Path(pyfunc_model.__file__)
SAMPLING_CODE = Path(sampling.__file__)
"""Shipped with every model version (code_paths), under the name shipped_module_name gives it."""


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
            # None: the size the model was trained at (the pyfunc checks both against its limits).
            ParamSpec("height", "long", None),
            ParamSpec("width", "long", None),
        ]),
    )


EXAMPLE_PROMPT = "a red circle on a blue background"


def serving_log_model_kwargs(pipeline_dir: Path) -> dict:
    """The log_model arguments that describe how the model is called: its signature (the folder's
    recorded sampler defaults) and an input example, one prompt with the cheapest request (1 step).
    MLflow saves the example as the model's serving_input_example.json and, at logging, loads the
    model and serves that example once: a version whose pyfunc cannot answer a request is caught
    then (a warning in MLflow 3.17), and costs one model load and one denoising step. The request
    limits travel in the pipeline folder itself (serving_limits.json), read by the pyfunc."""
    import pandas as pd

    defaults = read_defaults(pipeline_dir)
    example = (pd.DataFrame({"prompt": [EXAMPLE_PROMPT]}),
               {"sampler": defaults.sampler, "steps": 1, "guidance": defaults.guidance, "seed": 0})
    return {"signature": signature(defaults), "input_example": example}


def pip_requirements() -> list[str]:
    # Pinned from this environment; listing them explicitly skips MLflow's slow import capture.
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in
            ("mlflow", "diffusers", "transformers", "safetensors", "numpy", "pandas", "pillow")]
    return [f"torch=={version('torch').split('+')[0]}", *pins]


def shipped_module_name(code: Path) -> str:
    """`ldmflow_sampling_<sha256 of the file>`: MLflow puts a model's code_paths on sys.path, and a
    module stays in sys.modules once imported, so two versions whose shipped modules had one name
    would both run the first one loaded (mlflow/mlflow#12377). Named by content, versions with
    different code never collide, and versions with the same code share it harmlessly."""
    return f"ldmflow_sampling_{hashlib.sha256(code.read_bytes()).hexdigest()[:16]}"


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
        module = shipped_module_name(SAMPLING_CODE)
        with tempfile.TemporaryDirectory(prefix="ldm-code-") as tmp, mlflow.start_run(run_id=run_id):
            shipped = Path(tmp) / f"{module}.py"
            shutil.copyfile(SAMPLING_CODE, shipped)
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(PYFUNC_CODE),
                artifacts={pyfunc_model.PIPELINE_ARTIFACT: str(pipeline_dir)},
                code_paths=[str(shipped)],
                model_config={pyfunc_model.SAMPLING_MODULE: module},
                pip_requirements=pip_requirements(),
                **serving_log_model_kwargs(pipeline_dir),
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
