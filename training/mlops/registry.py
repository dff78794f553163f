"""Logging the exported pipeline as an MLflow model and registering it, idempotently.

MLflow's ``register_model`` always creates a new version, so a retried task would register the
same run twice. Here a run registers at most one version per model name, whatever step an earlier
attempt stopped after and even when two publishes of the run race: a retry finds what was done and
finishes the rest.
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


class RegistryError(ValueError):
    """A registry request that cannot be served as asked (unknown model, version or alias; a name no
    filter can express); the message names the thing."""


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


def shipped_module_name(code: Path) -> str:
    """`ldmflow_sampling_<sha256 of the file>`: MLflow puts a model's code_paths on sys.path, and a
    module stays in sys.modules once imported, so two versions whose shipped modules had one name
    would both run the first one loaded (mlflow/mlflow#12377). Named by content, versions with
    different code never collide, and versions with the same code share it harmlessly."""
    return f"ldmflow_sampling_{hashlib.sha256(code.read_bytes()).hexdigest()[:16]}"


def filter_literal(value: str) -> str:
    """`value` as a string literal of an MLflow search filter. MLflow's filter parser has no escape
    for a quote inside a literal ('it\\'s' and 'it''s' match nothing), but it reads both quote styles,
    so the literal takes the quote the value does not contain (checked against MLflow 3.17)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise RegistryError(f"model name {value!r} holds both quote characters, which MLflow's search filters cannot "
                        f"express; rename it")


def model_versions(client: MlflowClient, name: str) -> list:
    """Every version of registered model `name`, lowest number first."""
    found = client.search_model_versions(f"name = {filter_literal(name)}")
    return sorted((mv for mv in found if mv.name == name), key=lambda mv: int(mv.version))


def find_version(client: MlflowClient, name: str, run_id: str) -> RegisteredVersion | None:
    """The version of `name` that run `run_id` registered (the lowest, should a race have left two)."""
    # Searched by run id (hex, nothing to escape) and matched on the name here.
    found = sorted((mv for mv in client.search_model_versions(f"run_id = '{run_id}'") if mv.name == name),
                   key=lambda mv: int(mv.version))
    return RegisteredVersion(name=name, version=str(found[0].version), run_id=run_id) if found else None


def find_logged_model(client: MlflowClient, run_id: str):
    """The model a run already logged under MODEL_ARTIFACT and finished uploading (READY), oldest first:
    what a retry registers instead of logging a second copy. None when there is none."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return min(ready, key=lambda m: m.creation_timestamp, default=None)


def log_pipeline_model(client: MlflowClient, run_id: str, pipeline_dir: Path) -> str:
    """Log `pipeline_dir` as the pyfunc model of run `run_id` without touching the run's status, and
    return its models:/<model_id> URI.

    `mlflow.start_run(run_id=...)` would mark the run RUNNING and then FINISHED, rewriting a FAILED
    run's outcome (and, with two publishes at once, one could restore the RUNNING the other set).
    Instead the logged model is created in the run's experiment first, then filled through
    `Model.log(run_id=..., model_id=...)`, which links it to the run without an active run."""
    from mlflow.models import Model

    run = client.get_run(run_id)
    model = client.create_logged_model(experiment_id=run.info.experiment_id, name=MODEL_ARTIFACT,
                                       source_run_id=run_id)
    module = shipped_module_name(SAMPLING_CODE)
    with tempfile.TemporaryDirectory(prefix="ldm-code-") as tmp:
        shipped = Path(tmp) / f"{module}.py"
        shutil.copyfile(SAMPLING_CODE, shipped)
        info = Model.log(
            artifact_path=None, name=MODEL_ARTIFACT, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
            python_model=str(PYFUNC_CODE),
            artifacts={pyfunc_model.PIPELINE_ARTIFACT: str(pipeline_dir)},
            code_paths=[str(shipped)],
            model_config={pyfunc_model.SAMPLING_MODULE: module},
            signature=signature(read_defaults(pipeline_dir)),
            pip_requirements=pip_requirements(),
        )
    return info.model_uri


def _register_once(client: MlflowClient, model_uri: str, name: str, run_id: str) -> RegisteredVersion:
    """Register `model_uri`, then settle a race: MLflow keeps no uniqueness on (model, run), so two
    publishes of one run at once both create a version. Version numbers follow creation order, so
    whichever process made the higher number sees the lower one when it looks afterwards; it deletes
    its own and returns the lower. Only a process's own version is ever deleted."""
    mv = mlflow.register_model(model_uri, name)
    mine = str(mv.version)
    winner = find_version(client, name, run_id)
    if winner is None or winner.version == mine:
        log.info("registered %s version %s", name, mine)
        return RegisteredVersion(name=name, version=mine, run_id=run_id)
    log.info("run %s was registered concurrently as %s version %s; deleting the duplicate version %s",
             run_id, name, winner.version, mine)
    client.delete_model_version(name, mine)
    kept = client.get_model_version(name, winner.version)
    if getattr(mv, "model_id", None) and mv.model_id != getattr(kept, "model_id", None):
        client.delete_logged_model(mv.model_id)  # the duplicate's copy of the pipeline
    return winner


def register_pipeline(run_id: str, pipeline_dir: Path, name: str, tags: dict[str, str]) -> RegisteredVersion:
    """Log `pipeline_dir` as a pyfunc model of run `run_id`, register it under `name`, tag it and
    point the `candidate` alias at it: idempotent in every order.

    A retry finds what an earlier attempt finished: the version (only tags and alias re-applied), or
    else the run's logged model (registered, not logged again). The alias is written last, so an
    attempt that fails halfway leaves no version with alias `candidate` or `champion`."""
    client = MlflowClient()
    filter_literal(name)  # a name no filter can express: refused before anything is written
    found = find_version(client, name, run_id)
    if found is None:
        logged = find_logged_model(client, run_id)
        if logged is not None:
            log.info("run %s already logged model %s; registering it", run_id, logged.model_id)
        model_uri = logged.model_uri if logged is not None else log_pipeline_model(client, run_id, pipeline_dir)
        found = _register_once(client, model_uri, name, run_id)
    else:
        log.info("run %s already registered %s version %s; re-applying tags", run_id, name, found.version)
    for key, value in {"run_id": run_id, **tags}.items():
        client.set_model_version_tag(name, found.version, key, value)
    client.set_registered_model_alias(name, CANDIDATE, found.version)
    return found
