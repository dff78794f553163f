"""Typed run configuration, loaded from YAML with dotted ``key=value`` overrides.

YAML files only set values: every key must name a field of these dataclasses, and every value is
checked against the field's type before any work starts. Each field carries a docstring saying what
it controls; validation lives in ``__post_init__`` and names the field and the allowed values.
"""

from training.config.deepspeed import OFFLOAD_DEVICES, DeepSpeedConfig
from training.config.gate import GateConfig
from training.config.model import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    ModelConfig,
    NoiseSchedulerConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from training.config.run import TASKS, RunConfig, config_from_dict, load_config, parse_override, resolve_config_path
from training.config.serving import ServingConfig
from training.config.speed import SpeedConfig
from training.config.train import (
    CHECKPOINT_UPLOADS,
    LR_SCHEDULES,
    PRECISIONS,
    EMAConfig,
    TrackingConfig,
    TrainConfig,
    ValidationConfig,
)
from training.errors import ConfigError

__all__ = [
    "BETA_SCHEDULES", "CHECKPOINT_UPLOADS", "LR_SCHEDULES", "OFFLOAD_DEVICES", "PRECISIONS", "PREDICTION_TYPES",
    "TASKS", "ConfigError", "DeepSpeedConfig", "EMAConfig", "GateConfig", "ModelConfig", "NoiseSchedulerConfig",
    "RunConfig", "ServingConfig", "SpeedConfig",
    "TextEncoderConfig", "TrackingConfig", "TrainConfig", "UNetConfig", "VAEConfig", "ValidationConfig",
    "config_from_dict", "load_config", "parse_override", "resolve_config_path",
]
