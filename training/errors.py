"""Errors of the training side that the CLI reports as one line (kept free of heavy imports)."""

from __future__ import annotations


class DataError(ValueError):
    """The shards cannot feed this run (wrong resolution, too few samples, ...)."""
