"""Where a pretrained component lives: a component folder, a diffusers pipeline folder, or a hub id.

A config names each pretrained part (UNet, VAE, text encoder, tokenizer) by one string. Locally it is
either the component's own folder (``config.json`` + weights, as ``save_pretrained`` writes it) or a
whole pipeline folder (``model_index.json`` with ``unet/ vae/ text_encoder/ tokenizer/``), so one
path to a Stable Diffusion folder serves every key. An MLflow URI (`runs:/RUN_ID/vae`, the VAE
`ldmflow train-vae` logs, or `models:/NAME@ALIAS` of a registered pipeline) is downloaded once into
the runs folder's model cache and then read as a folder. Anything that is not an existing folder
and does not look like a path is passed on as a hub id. The errors name the config key, the path and
what is missing, and come before any weights are read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from data_prep import storage
from training.errors import ConfigError
from training.locations import runs_dir, setup_mlflow

PIPELINE_INDEX = "model_index.json"


class ModelPathError(ConfigError, FileNotFoundError):
    """A configured model path does not exist or lacks the component asked for. Both a ConfigError
    (a wrong config value) and a FileNotFoundError (what a missing path has always raised here)."""


@dataclass(frozen=True)
class Location:
    """What to hand to ``from_pretrained``: a local folder or a hub id, and the subfolder within."""

    path: str
    subfolder: str | None = None
    local: bool = True

    @property
    def folder(self) -> Path:
        """The component's own local folder."""
        return Path(self.path) / self.subfolder if self.subfolder else Path(self.path)

    def __str__(self) -> str:
        return str(self.folder) if self.local else self.path


def looks_local(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (absolute, ./, ~, deeper) is a path."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def locate(name: str, component: str, key: str, *, expected_class: str | None = None) -> Location:
    """Find `component` (unet, vae, text_encoder, tokenizer) for the config key `key`.

    `component/` inside the folder wins (a pipeline folder); else the folder itself must be the
    component (its config.json, or for a tokenizer its tokenizer files). `expected_class`, when given,
    is checked against the ``_class_name`` diffusers writes into the component's config.json.
    """
    if name.startswith(MLFLOW_SCHEMES):
        name = fetch_mlflow_folder(name, key)
    folder = Path(name).expanduser()
    if not folder.exists():
        if looks_local(name):
            raise ModelPathError(f"config key `{key}`: {name} does not exist (give a local folder or a hub id)")
        return Location(name, local=False)
    if not folder.is_dir():
        raise ModelPathError(f"config key `{key}`: {name} is a file; give the {component} folder or a pipeline "
                             f"folder holding {component}/")
    if (folder / component).is_dir():
        location = Location(str(folder), component)
    elif (folder / PIPELINE_INDEX).is_file():
        raise ModelPathError(f"config key `{key}`: the pipeline folder {name} has no {component}/ subfolder "
                             f"({folder / component} is missing)")
    else:
        location = Location(str(folder))
    marker = "tokenizer_config.json" if component == "tokenizer" else "config.json"
    if component == "tokenizer":
        if not any((location.folder / f).is_file() for f in (marker, "tokenizer.json", "vocab.json", "vocab.txt")):
            raise ModelPathError(f"config key `{key}`: {location.folder} holds no tokenizer files "
                                 "(tokenizer_config.json, tokenizer.json or a vocabulary)")
        return location
    config_file = location.folder / marker
    if not config_file.is_file():
        kind = f"the {component}/ folder" if location.subfolder else "a component folder"
        raise ModelPathError(f"config key `{key}`: {location.folder} has no config.json: it is neither {kind} nor a "
                             f"pipeline folder with {component}/")
    if expected_class is not None:
        found = _class_name(config_file)
        if found is not None and found != expected_class:
            raise ConfigError(f"config key `{key}`: {location.folder} holds a {found}; expected {expected_class}")
    return location


MLFLOW_SCHEMES = ("runs:/", "models:/")


def fetch_mlflow_folder(uri: str, key: str) -> str:
    """The local folder of an MLflow artifact or registered model URI, downloaded into
    <runs dir>/model-cache/ once per immutable source (a run's artifact; a model *version*, so an
    alias that moves fetches the new version). A registered ldmflow pipeline resolves to its pipeline
    folder (artifacts/pipeline/ inside the MLflow model)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    setup_mlflow()
    source = uri
    try:
        if uri.startswith("models:/"):
            source = _model_version_source(uri)
        digest = hashlib.sha256(source.encode()).hexdigest()[:24]
        folder = runs_dir() / "model-cache" / digest
        if not folder.is_dir():
            # Atomic: a half download is never taken for the model; a folder another process
            # published meanwhile is kept.
            with storage.temporary_dir(folder, replace=False) as tmp:
                mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
    except MlflowException as e:
        raise ModelPathError(f"config key `{key}`: {uri} could not be fetched from MLflow: {e.message}") from None
    # download_artifacts puts a run's artifact folder under its own name inside dst_path.
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else folder
    pipeline = root / "artifacts" / "pipeline"
    return str(pipeline if pipeline.is_dir() else root)


def _model_version_source(uri: str) -> str:
    """`models:/name@alias` -> `models:/name/version`: a fixed version, so the cache key is too."""
    from mlflow import MlflowClient

    name, _, ref = uri[len("models:/"):].partition("@")
    client = MlflowClient()
    if not ref:
        return uri
    return f"models:/{name}/{client.get_model_version_by_alias(name, ref).version}"


def _class_name(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
