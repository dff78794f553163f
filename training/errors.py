"""Errors of the training side that the CLI reports as one line (kept free of heavy imports)."""

from __future__ import annotations


class DataError(ValueError):
    """The shards cannot feed this run (wrong resolution, too few samples, ...)."""


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it and what is allowed."""


class EvaluationError(ValueError):
    """An evaluation cannot run as asked (a model URI of an unknown form, too many prompts, ...)."""


class ModelLoadError(ValueError):
    """A model URI is malformed, names no model/version/alias, or its server does not answer; the
    message names the URI and what to do."""


class PromptFileError(ValueError):
    """A prompt file cannot be read as prompts; the message names the file and the fix."""


class TrackingUnavailable(RuntimeError):
    """The tracking server could not be reached within the allowed time; the message says what was
    done and what is missing."""
