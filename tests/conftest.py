"""Session-wide isolation: every test run writes under its own temporary runs directory and talks
only to servers it starts itself on 127.0.0.1."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def pytest_configure(config):
    runs = Path(tempfile.mkdtemp(prefix="ldmflow-test-runs-"))
    os.environ["LDMFLOW_RUNS_DIR"] = str(runs)
    os.environ["PREFECT_HOME"] = str(runs / "prefect")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
