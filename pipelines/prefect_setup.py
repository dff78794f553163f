"""Where Prefect keeps its state on this machine; imported before Prefect itself."""

from __future__ import annotations

import os
from pathlib import Path

from training.locations import runs_dir


def prefect_home() -> Path:
    """Keep Prefect's local server database beside the other run state instead of ~/.prefect.
    Prefect creates PREFECT_HOME itself but not its parents, which a fresh clone lacks."""
    home = Path(os.environ.setdefault("PREFECT_HOME", str(runs_dir() / "prefect")))
    home.mkdir(parents=True, exist_ok=True)
    return home


prefect_home()
