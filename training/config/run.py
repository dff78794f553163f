"""The whole run config (RunConfig) and how it is read: YAML presets, plain dicts, dotted overrides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.config.checks import check_key
from training.config.gate import GateConfig
from training.config.model import ModelConfig
from training.config.serving import ServingConfig
from training.config.train import TrackingConfig, TrainConfig, ValidationConfig
from training.errors import ConfigError

TASKS = ("ldm", "vae")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "tiny"
    """Preset name, recorded with the run."""
    task: str = "ldm"
    """What the run trains: `ldm`, the latent diffusion UNet against a frozen VAE and text encoder
    (`ldmflow train`), or `vae`, the first-stage AutoencoderKL that model.vae describes
    (`ldmflow train-vae`). One training loop runs both; see training.tasks."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    """When a registered version becomes `champion` (training.eval.gate); not hashed."""
    serving: ServingConfig = field(default_factory=ServingConfig)
    """Request limits of the registered model (it changes no training: not part of a run's identity)."""

    def __post_init__(self) -> None:
        check_key(self.task in TASKS, "task", f"one of {', '.join(TASKS)}", self.task)
        if self.task == "ldm":
            steps = self.model.scheduler.num_train_timesteps
            check_key(all(t < steps for t in self.validation.timesteps), "validation.timesteps",
                   f"timesteps below model.scheduler.num_train_timesteps ({steps})", self.validation.timesteps)
            # The exported model's defaults (tracking.*) are what a request naming nothing gets:
            # they must be servable within its own limits.
            serving = self.serving
            check_key(self.tracking.sample_steps <= serving.max_steps, "tracking.sample_steps",
                      f"<= serving.max_steps ({serving.max_steps})", self.tracking.sample_steps)
            check_key(serving.min_guidance <= self.tracking.guidance <= serving.max_guidance, "tracking.guidance",
                      f"within serving.min_guidance..max_guidance ({serving.min_guidance}..{serving.max_guidance})",
                      self.tracking.guidance)
            if serving.max_image_size is not None:
                check_key(serving.max_image_size >= self.model.resolution, "serving.max_image_size",
                          f"null or >= model.resolution ({self.model.resolution})", serving.max_image_size)
        if self.task == "vae":
            check_key(self.model.vae.pretrained is None, "model.vae.pretrained",
                   "null for `train-vae` (the VAE it trains is built from model.vae's shape fields)",
                   self.model.vae.pretrained)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, as logged to MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the fields that change training (tags runs and model
        versions, so two runs that would train the same model share it): NOT_TRAINING_FIELDS are left out."""
        kept = {k: v for k, v in self.flat().items() if not not_training(k)}
        blob = json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


NOT_TRAINING_FIELDS = frozenset({
    "name",  # the preset's name: two presets with the same values train the same model
    "train.log_every", "train.max_failures", "train.loader_workers",
    "train.cluster_wait_s", "train.checkpoints_to_keep", "train.checkpoint_upload", "train.max_pending_uploads",
    # Where DeepSpeed keeps things and what it recomputes, not what it computes (zero.Init builds the same
    # initial weights: tests/training/runtime/test_deepspeed_options.py). train.deepspeed.extra is hashed.
    "train.deepspeed.offload_optimizer", "train.deepspeed.offload_param", "train.deepspeed.nvme_path",
    "train.deepspeed.pin_memory", "train.deepspeed.activation_checkpointing", "train.deepspeed.zero_init",
    # How fast a step runs, not what it computes: the same model, objective, data and optimizer update;
    # the kernels differ only in floating-point rounding (attention kernel, fused vs foreach AdamW,
    # compiled fusions, memory layout), as a run on another GPU would. TF32 is the closest call (fp32
    # matmul inputs rounded to 10 mantissa bits on Ampere+), but it is a property of the hardware path
    # like cuDNN's algorithm choice, while train.precision, the dtype the weights train in, stays hashed.
    "train.speed",
    "tracking",  # where and how a run is recorded, not what it trains
    "gate", "serving",  # what happens to the model after training
})
"""Dotted config keys (a section name covers all of its keys) left out of RunConfig.hash: they say
how a run is watched, recorded, retried or served, not what it trains. Add a section here when it
joins the config."""


def not_training(key: str) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in NOT_TRAINING_FIELDS for i in range(1, len(parts) + 1))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key `{key}` has an unsupported value")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key `{key}` must be a mapping of fields, got {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key `{key}` must be a mapping, got {value!r}")
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key `{key}` must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key `{key}` must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key `{key}` must be a string, got {value!r}")
    raise ConfigError(f"config key `{key}` has unsupported type {tp!r}")


def _plain(value: Any, key: str) -> Any:
    """A free-form mapping's value (e.g. train.deepspeed.extra): plain YAML/JSON data only."""
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"config key `{key}` must be plain data (mapping, list, number, string, bool), got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key `{key}` (allowed here: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override `{dotted}`: `{part}` is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-4`` -> ("train.lr", 0.0001). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.problem})") from None
    return key, value


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return _build(RunConfig, data)


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_config_path(path: str | Path) -> Path:
    """A file path as given; else the same path under the project root (so `configs/tiny.yaml`
    works from any working directory); else a preset name (`tiny` -> configs/tiny.yaml)."""
    path = Path(path)
    for candidate in (path, PROJECT_ROOT / path, PROJECT_ROOT / "configs" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in (PROJECT_ROOT / "configs").glob("*.yaml")))
    raise ConfigError(f"config file {path} does not exist (presets: {presets}; or give a YAML path)")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML preset, apply ``key=value`` overrides, validate everything."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not readable YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return config_from_dict(data, overrides)
