"""Config value checks: data_prep.checks with the config's labels ("config key `train.lr`") and error."""

from __future__ import annotations

from typing import Any

from data_prep.checks import require
from training.errors import ConfigError


def check_key(condition: bool, key: str, allowed: str, got: Any) -> None:
    """ConfigError "config key `<key>` must be <allowed>, got <got>" unless `condition`."""
    require(condition, f"config key `{key}`", allowed, got, error=ConfigError)
