"""Typed flow parameters, validated before any work.

Prefect validates a flow's parameters against its signature with pydantic when the flow run starts:
a value these types refuse fails the run at once, and the message names the parameter. What needs
more than one parameter at a time (a config path with its overrides) is checked in the flow's first
lines by `run_config`, which names the parameter too.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from data_prep import storage
from training.config import RunConfig, load_config, parse_override, resolve_config_path
from training.errors import ConfigError


def _config_path(value: str) -> str:
    resolve_config_path(value)  # ConfigError (a ValueError) names the file and the presets
    return value


def _override(value: str) -> str:
    parse_override(value)
    return value


def _uri(value: str) -> str:
    """A local path or s3://bucket/prefix; any other scheme is refused (storage's own message)."""
    if not value.strip():
        raise ValueError("must be a local path or s3://bucket/prefix, got an empty string")
    try:
        storage.storage_for(value)  # refuses other schemes and malformed s3:// URIs
    except storage.StorageError as e:
        raise ValueError(str(e)) from None  # pydantic names the parameter only for a ValueError
    return value


def _model_uri(value: str) -> str:
    if not value.startswith(("models:/", "runs:/")) and "://" in value:
        raise ValueError(f"must be models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a pipeline "
                         f"folder, got {value!r}")
    return value


ConfigPath = Annotated[str, AfterValidator(_config_path)]
"""A YAML config file or preset name (`tiny` -> configs/tiny.yaml)."""
Override = Annotated[str, AfterValidator(_override)]
"""A `key=value` config override, e.g. train.max_steps=50."""
StorageUri = Annotated[str, AfterValidator(_uri)]
"""A local path or s3://bucket/prefix."""
ModelUri = Annotated[str, AfterValidator(_model_uri)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(gt=0)]
"""A timeout in seconds (> 0)."""
WaitSeconds = Annotated[float, Field(ge=0)]
ModelName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


def run_config(param: str, path: str, overrides: list[str] | None, *, task: str) -> RunConfig:
    """The resolved config of flow parameter `param` (and its overrides), or one ConfigError naming
    the parameter: unknown keys, ill-typed values and a config of the wrong task fail here, before any
    work. Tasks get the RunConfig itself and never re-read the file (a worker elsewhere may lack it)."""
    try:
        cfg = load_config(path, list(overrides or []))
    except ConfigError as e:
        raise ConfigError(f"flow parameter `{param}` ({path}): {e}") from None
    if cfg.task != task:
        raise ConfigError(f"flow parameter `{param}`: {path} is a `{cfg.task}` config; this flow trains `{task}`")
    return cfg


def check_source(param: str, uri: str) -> str:
    """`uri` absolute, after checking it can be read (a missing folder, unknown bucket or refused
    credentials stop the flow before any work)."""
    try:
        storage.storage_for(uri).check_readable(uri)
    except (storage.StorageError, OSError) as e:
        raise ConfigError(f"flow parameter `{param}`: {e}") from None
    return storage.absolute(uri)


def check_output(param: str, uri: str) -> str:
    """`uri` absolute, after checking it (or where it would be created) can be written."""
    try:
        storage.storage_for(uri).check_writable(uri)
    except (storage.StorageError, OSError) as e:
        raise ConfigError(f"flow parameter `{param}`: {e}") from None
    return storage.absolute(uri)
