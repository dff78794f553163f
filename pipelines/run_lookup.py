"""A finished training run read back from MLflow: what the register flow publishes."""

from __future__ import annotations

from training.config import RunConfig, config_from_dict
from training.errors import ConfigError
from training.locations import setup_mlflow
from training.mlops.publish import TrainOutcome
from training.mlops.tracking import CONFIG_ARTIFACT


def outcome_of_run(run_id: str) -> tuple[TrainOutcome, RunConfig]:
    """The TrainOutcome and resolved config of MLflow run `run_id`, as `train` returned them; a
    ConfigError names the run when it did not finish training (no final checkpoint tag)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    setup_mlflow()
    try:
        run = MlflowClient().get_run(run_id)
        config = config_from_dict(mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}"))
    except MlflowException as e:
        raise ConfigError(f"flow parameter `run_id`: MLflow run {run_id} cannot be read: {e.message}") from None
    tags = run.data.tags
    if "checkpoint" not in tags:
        raise ConfigError(f"flow parameter `run_id`: MLflow run {run_id} has no final checkpoint (tag `checkpoint`): "
                          f"it did not finish training; resume it with `ldmflow train --resume {run_id}`")
    outcome = TrainOutcome(run_id=run_id, checkpoint_dir=tags["checkpoint"], metrics=dict(run.data.metrics),
                           dataset_content_id=tags.get("dataset_content_id", ""),
                           config_hash=tags.get("config_hash", config.hash), data=tags.get("data", ""))
    return outcome, config
