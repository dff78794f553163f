"""Logging the exported pipeline as an MLflow model and registering it, idempotently.

MLflow's ``register_model`` always creates a new version, so a retried task would register the
same run twice. Here a run registers at most one version per model name, whatever step an earlier
attempt stopped after and even when two publishes of the run race: a retry finds what was done and
finishes the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
            pip_requirements=pip_requirements(),
            **serving_log_model_kwargs(pipeline_dir),
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


# --- the champion: reading versions, serialised moves, their record ----------------------------

CHAMPION = "champion"
STACK_TAG = "ldmflow.champion_stack"
"""Registered-model tag: the versions that were champion, oldest first (JSON); rollback pops it."""
STACK_LIMIT = 100
LOCK_SUFFIX = ".promotion-lock"
LEASE_SUFFIX = ".training-lease"
"""Registered models that are locks, not models: a model's promotion lock, a run's training lease
(training.runtime.lease). Listings of models leave them out."""
USER_ENV = "LDMFLOW_USER"


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def require_model(client: MlflowClient, name: str):
    """The registered model `name`, or RegistryError naming the models there are."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
    known = sorted(m.name for m in client.search_registered_models()
                   if not m.name.endswith((LOCK_SUFFIX, LEASE_SUFFIX)))
    raise RegistryError(f"no registered model {name!r} in the MLflow registry at {mlflow.get_registry_uri()} "
                        f"(there are: {', '.join(known) or 'none'})") from None


def resolve_version(client: MlflowClient, name: str, ref: str):
    """Version `ref` of `name`: a version number or an alias (`champion`, `candidate`, ...)."""
    from mlflow.exceptions import MlflowException

    model = require_model(client, name)
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as e:
        if not _not_found(e) and "alias" not in str(e).lower():
            raise
    aliases = ", ".join(sorted(model.aliases)) or "none"
    versions = ", ".join(str(mv.version) for mv in model_versions(client, name)) or "none"
    raise RegistryError(f"{name!r} has no version or alias {ref!r} (versions: {versions}; aliases: {aliases})"
                        ) from None


def current_champion(client: MlflowClient, name: str):
    """The version alias `champion` points at now, or None. Read fresh each time: alias writes are
    last-writer-wins, so a value read earlier may be stale."""
    return require_model(client, name).aliases.get(CHAMPION) and client.get_model_version_by_alias(name, CHAMPION)


def user() -> str:
    import getpass

    return os.environ.get(USER_ENV) or getpass.getuser()


@dataclass
class Move:
    """One move of the `champion` alias, as recorded on the versions."""

    name: str
    version: str
    previous: str | None
    action: str
    """`gate` (a promotion the gate decided), `force` (a person overrode it) or `rollback`."""
    by: str
    at: str
    why: str


@contextmanager
def promotion_lock(client: MlflowClient, name: str, *, ttl_s: float = 1800.0, wait_s: float = 1800.0,
                   poll_s: float = 1.0) -> Iterator[str]:
    """Serialise the champion moves of model `name` across processes and machines.

    MLflow has no compare-and-swap on aliases (the last write wins), but creating a registered model
    is atomic on the server (names are unique in its store), so a registered model named
    `<name>.promotion-lock` is the lock: whoever creates it holds it, and deletes it when done. Its
    tags name the owner and an expiry, so a lock left by a crashed gate is broken after `ttl_s`
    (two processes breaking one expired lock at once could both proceed: the only window left).
    Waits up to `wait_s` for a live lock, then raises RegistryError naming its owner."""
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    owner = f"{user()}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"owner": owner, "expires": f"{time.time() + ttl_s:.0f}"},
                description=f"held by {owner} while it moves the champion of {name}; deleted when done")
            break
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock).tags
        except MlflowException as e:
            if _not_found(e):
                continue  # released between our create and our read
            raise
        if float(held.get("expires", 0)) < time.time():
            log.warning("breaking the expired promotion lock of %s held by %s", name, held.get("owner"))
            _delete_quietly(client, lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"the champion of {name!r} is being moved by {held.get('owner')} (lock {lock!r}); "
                                f"try again later, or delete that registered model if its owner is gone")
        time.sleep(poll_s)
    try:
        yield owner
    finally:
        try:
            if client.get_registered_model(lock).tags.get("owner") == owner:
                client.delete_registered_model(lock)
        except MlflowException as e:
            if not _not_found(e):
                raise


def _delete_quietly(client: MlflowClient, model: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(model)
    except MlflowException as e:
        if not _not_found(e):
            raise


def champion_stack(client: MlflowClient, name: str) -> list[str]:
    """The versions that were champion, oldest first, ending with the current one (an alias moved by
    hand outside this module is appended)."""
    model = require_model(client, name)
    stack = [str(v) for v in json.loads(model.tags.get(STACK_TAG, "[]"))]
    current = model.aliases.get(CHAMPION)
    if current is not None and (not stack or stack[-1] != str(current)):
        stack.append(str(current))
    return stack


def move_champion(client: MlflowClient, name: str, version: str, *, action: str, why: str,
                  by: str | None = None) -> Move:
    """Point `champion` at `version` and record the move: tags champion.{by,at,from,action,why} on the
    new champion, champion.replaced_{by,at} on the old one, and the champion stack on the model. Call
    it holding promotion_lock; it re-reads the champion itself, so `from` is what it replaced."""
    from datetime import datetime, timezone

    target = resolve_version(client, name, str(version))
    stack = champion_stack(client, name)
    previous = stack[-1] if stack else None
    move = Move(name=name, version=str(target.version), previous=previous, action=action, by=by or user(),
                at=datetime.now(timezone.utc).isoformat(timespec="seconds"), why=why)
    if action == "rollback":
        stack = stack[:-1]
    else:
        stack.append(move.version)
    client.set_registered_model_alias(name, CHAMPION, move.version)
    for key, value in {"by": move.by, "at": move.at, "from": previous or "none", "action": action,
                       "why": why}.items():
        client.set_model_version_tag(name, move.version, f"champion.{key}", value)
    if previous is not None and previous != move.version:
        client.set_model_version_tag(name, previous, "champion.replaced_by", move.version)
        client.set_model_version_tag(name, previous, "champion.replaced_at", move.at)
    client.set_registered_model_tag(name, STACK_TAG, json.dumps(stack[-STACK_LIMIT:]))
    log.info("%s: champion %s -> %s (%s by %s: %s)", name, previous, move.version, action, move.by, why)
    return move


def rollback(client: MlflowClient, name: str, *, why: str, by: str | None = None) -> Move:
    """Restore the champion before the current one (the champion stack's previous entry)."""
    with promotion_lock(client, name):
        stack = champion_stack(client, name)
        if len(stack) < 2:
            current = stack[-1] if stack else "none"
            raise RegistryError(f"{name!r} has no earlier champion to restore (champion now: {current})")
        return move_champion(client, name, stack[-2], action="rollback", why=why, by=by)
