"""What a successful command prints: its own progress and results, not other libraries' notices.

Called first by the `ldmflow` CLI and `make demo`, before the ML libraries are imported (several of
these switches are read once, at import or at Ray start-up, which passes the environment to local
workers). Each setting is a default: an environment variable set by the user wins.
"""

from __future__ import annotations

import logging
import os
import warnings

QUIET_ENV = {
    # transformers 5 draws a "Loading weights" bar for every model it loads, on every worker.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # MLflow's bar for each artifact download of a model version.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Prefect's local server sends anonymous usage data on start-up; offline it fails, and with
    # SQLite it has printed "database is locked" tracebacks from a successful flow.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_third_party() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # diffusers imports every pipeline's image processors; without torchvision (not needed for
    # text-to-image training) transformers says so once per processor class.
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropMessages("requires torchvision"))
    # The pipeline's text encoder is whatever the config names (MiniLM in the presets), not the CLIP
    # model StableDiffusionPipeline's annotations expect; it warns on every load, though it works.
    logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(_DropMessages("Expected types for text_encoder"))
    # The registered pyfunc declares its signature explicitly (training/registry.py): MLflow's advice to
    # infer one from type hints or an input example (which it would run through a full generation at
    # logging time) does not apply.
    warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
