"""A real MLflow server holding one tiny registered model with alias `champion`, for consumer tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.mlflow_server import MlflowServer
from tests.training.tiny_pipeline import save_tiny_pipeline
from training.locations import setup_mlflow
from training.mlops.registry import register_pipeline
from training.models.sampling import SamplerDefaults

NAME = "ldm-consumer-test"


@dataclass
class Registered:
    uri: str
    """The tracking server."""
    name: str
    version: str
    run_id: str
    folder: Path
    """The pipeline folder that was registered."""


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Registered:
    tmp = tmp_path_factory.mktemp("consumer")
    server = MlflowServer(tmp / "mlflow").start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        try:
            setup_mlflow()
            folder = save_tiny_pipeline(tmp / "pipeline", SamplerDefaults(steps=2))
            mlflow.set_experiment("ldmflow-consumer-test")
            with mlflow.start_run() as run:
                pass
            version = register_pipeline(run.info.run_id, folder, NAME, {})
            # The gate is not part of this test: point champion at the version by hand, as `promote` would.
            MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
            yield Registered(server.uri, NAME, version.version, run.info.run_id, folder)
        finally:
            server.stop()
