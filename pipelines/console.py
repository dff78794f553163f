"""What a successful command prints: its own progress and results, not other libraries' notices.

Called first by the `ldmflow` CLI and `make demo`, before the ML libraries are imported (several of
these switches are read once, at import or at Ray start-up, which passes the environment to local
workers). Each setting is a default: an environment variable set by the user wins.
"""

from __future__ import annotations

import os

from training.quiet import quiet_libraries

QUIET_ENV = {
    # transformers 5 draws a "Loading weights" bar for every model it loads, on every worker.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # MLflow's bar for each artifact download of a model version.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Prefect's local server sends anonymous usage data on start-up; offline it fails, and with
    # SQLite it has printed "database is locked" tracebacks from a successful flow.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def quiet_third_party() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    quiet_libraries()
