"""A real MLflow server holding one tiny registered model with alias `champion`, for consumer tests.

One per test session (the `registered` fixture in tests/conftest.py, on the session's `mlflow_server`):
the consumer tests of several modules only read it (generate, generate-batch, the README's lines, the
batch flow), so each module starting its own server and registering the same model again bought nothing."""

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


def serve_registered(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """Register the model on `server` (the session's, shared with other modules: the names here are this
    fixture's own) and return it. This process points at the server only while registering: each test
    sets MLFLOW_TRACKING_URI itself, and every other test of the session keeps the default store."""
    tmp = tmp_path_factory.mktemp("consumer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        setup_mlflow()
        folder = save_tiny_pipeline(tmp / "pipeline", SamplerDefaults(steps=2))
        experiment = mlflow.set_experiment("ldmflow-consumer-test")
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            pass
        version = register_pipeline(run.info.run_id, folder, NAME, {})
        # The gate is not part of this test: point champion at the version by hand, as `promote` would.
        MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
    setup_mlflow()  # back to the default store (mlflow.set_tracking_uri is process-wide)
    mlflow.tracking.fluent._active_experiment_id = None
    return Registered(server.uri, NAME, version.version, run.info.run_id, folder)
