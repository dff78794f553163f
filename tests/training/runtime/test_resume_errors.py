"""`--resume` and storage refusals: each is one clear message before any Ray worker starts (these
tests never start Ray; a refusal that came later would fail them by trying to)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from pipelines.cli import main
from training.checkpoint.layout import TrainState
from training.checkpoint.writer import mark_committed, save_rank_files, write_file_list
from training.config import load_config
from training.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    root = tmp_path_factory.mktemp("resume-data")
    generate_synthetic(root / "raw", 16, seed=2)
    build_shards(ShardConfig(source=str(root / "raw"), output=str(root / "shards"), samples_per_shard=8,
                             progress=False))
    return root / "shards"


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray is a failure here: every refusal must come before it."""
    import training.runtime.driver

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the refusal")

    monkeypatch.setattr(training.runtime.driver, "prepare_cluster", refuse)


def make_run(storage_uri: str, data: Path, cfg, **extra_tags: str) -> str:
    """An MLflow run as `ldmflow train` leaves it when its driver dies: tags, config, no checkpoint yet."""
    import mlflow

    from training.locations import setup_mlflow
    from training.mlops.tracking import CONFIG_ARTIFACT, STORAGE_TAG, ensure_experiment

    setup_mlflow()
    from data_prep.dataset import read_dataset

    tags = {STORAGE_TAG: storage_uri, "data": str(data), "dataset_content_id": read_dataset(str(data)).content_id}
    with mlflow.start_run(experiment_id=ensure_experiment("resume-errors"), tags={**tags, **extra_tags},
                          run_name=f"r-{uuid.uuid4().hex[:8]}") as run:
        mlflow.log_dict(cfg.to_dict(), CONFIG_ARTIFACT)
    return run.info.run_id


def commit_checkpoint(folder: Path, *, step: int, config: dict, frozen: dict) -> None:
    """A committed 1-rank checkpoint in the project's layout (DeepSpeed's files faked by bytes)."""
    import torch

    from training.checkpoint.writer import rng_state

    tag = f"step-{step:08d}"
    (folder / "deepspeed" / tag).mkdir(parents=True)
    (folder / "deepspeed" / tag / "mp_rank_00_model_states.pt").write_bytes(b"model" * 10)
    save_rank_files(folder, 0, loader={}, rng=rng_state(torch.Generator()))
    digest = write_file_list(folder, 0)
    mark_committed(folder, TrainState(step=step, world_size=1, tag=tag, config=config, frozen=frozen), [digest])


def frozen_of(cfg) -> dict:
    from training.models.assembly import build_frozen, frozen_hashes

    return frozen_hashes(*build_frozen(cfg.model))


def resume_error(run_id: str, *args: str) -> str:
    from training.runtime.driver import resume

    with pytest.raises(ConfigError) as e:
        resume(run_id, list(args))
    return str(e.value)


def test_unknown_run(no_ray, capsys):
    assert main(["train", "--resume", "0123456789abcdef0123456789abcdef", "--no-register"]) == 2
    err = capsys.readouterr().err
    assert "no such MLflow run" in err and "Traceback" not in err


def test_run_without_a_verified_checkpoint(no_ray, tmp_path, shards):
    cfg = load_config("tiny")
    run_id = make_run(str(tmp_path / "storage"), shards, cfg)
    # A checkpoint folder without its COMMITTED marker (the driver died mid-save) does not count.
    partial = tmp_path / "storage" / f"train-{run_id}" / "checkpoint_2026-11-24_00-00-00.000000"
    commit_checkpoint(partial, step=4, config=cfg.to_dict(), frozen=frozen_of(cfg))
    (partial / "COMMITTED").unlink()
    message = resume_error(run_id)
    assert "no verified checkpoint" in message and "new run" in message


def test_checkpoint_of_another_model(no_ray, tmp_path, shards):
    cfg = load_config("tiny")
    run_id = make_run(str(tmp_path / "storage"), shards, cfg)
    other = load_config("tiny", ["model.unet.layers_per_block=2"]).to_dict()
    commit_checkpoint(tmp_path / "storage" / f"train-{run_id}" / "checkpoint_a", step=4, config=other,
                      frozen=frozen_of(cfg))
    message = resume_error(run_id)
    assert "different model" in message and "model.unet" in message


def test_checkpoint_trained_against_other_frozen_weights(no_ray, tmp_path, shards):
    cfg = load_config("tiny")
    run_id = make_run(str(tmp_path / "storage"), shards, cfg)
    frozen = {**frozen_of(cfg), "vae": "0" * 64}
    commit_checkpoint(tmp_path / "storage" / f"train-{run_id}" / "checkpoint_a", step=4, config=cfg.to_dict(),
                      frozen=frozen)
    assert "vae" in resume_error(run_id)


def test_only_how_the_run_continues_may_change(no_ray, tmp_path, shards):
    cfg = load_config("tiny")
    run_id = make_run(str(tmp_path / "storage"), shards, cfg)
    assert "cannot change on resume" in resume_error(run_id, "train.lr=0.1")
    assert "cannot change on resume" in resume_error(run_id, "model.resolution=32")
    # What happens to the model after training may: past the key check, this run has no checkpoint.
    assert "no verified checkpoint" in resume_error(run_id, "gate.margin=0.05", "serving.max_prompts=8")


def test_resume_refuses_data_and_config_flags(no_ray, capsys):
    assert main(["train", "--resume", "abc", "--data", "x"]) == 2
    assert "--resume continues a run with its own config" in capsys.readouterr().err


def test_checkpoint_already_at_max_steps(no_ray, tmp_path, shards):
    """A run that finished and recorded its final checkpoint: resuming it trains nothing more unless asked."""
    from training.checkpoint.verify import latest_verified_checkpoint

    cfg = load_config("tiny", ["train.max_steps=4"])
    run_id = make_run(str(tmp_path / "storage"), shards, cfg)
    commit_checkpoint(tmp_path / "storage" / f"train-{run_id}" / "checkpoint_a", step=4, config=cfg.to_dict(),
                      frozen=frozen_of(cfg))
    import mlflow

    final = latest_verified_checkpoint(str(tmp_path / "storage" / f"train-{run_id}"))
    mlflow.MlflowClient().set_tag(run_id, "checkpoint", final.uri)
    assert "--max-steps" in resume_error(run_id)


def test_final_checkpoint_never_recorded_finishes_the_run(no_ray, tmp_path, shards):
    """The driver was killed after the final checkpoint but before the run recorded it (a Ray job's retry
    then resumes it): resume finishes the run from that checkpoint, without Ray, instead of refusing."""
    import mlflow

    from training.runtime.driver import recorded_outcome, resume

    cfg = load_config("tiny", ["train.max_steps=4"])
    run_id = make_run(str(tmp_path / "storage"), shards, cfg)
    assert recorded_outcome(run_id) is None  # its driver died: nothing recorded
    mlflow.MlflowClient().log_metric(run_id, "loss", 0.25, step=4)
    commit_checkpoint(tmp_path / "storage" / f"train-{run_id}" / "checkpoint_b", step=4, config=cfg.to_dict(),
                      frozen=frozen_of(cfg))
    outcome, _ = resume(run_id)
    assert outcome.run_id == run_id and outcome.checkpoint_dir.endswith("checkpoint_b")
    assert outcome.metrics == {"loss": 0.25} and outcome.config_hash == cfg.hash
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint"] == outcome.checkpoint_dir
    assert run.data.tags["resume.1.finished_from_checkpoint"] == "true"
    assert "--max-steps" in resume_error(run_id)  # now recorded: a second resume trains nothing
    # What a retried Ray job publishes for a run its predecessor finished (training.runtime.job_entry).
    assert recorded_outcome(run_id) == outcome


def test_a_run_extended_by_resume_keeps_its_new_config_hash_through_a_retry(no_ray, tmp_path, shards):
    """`--resume RUN --max-steps 6` of a 4-step run: the run trains under the 6-step config, and its driver is
    killed after the final checkpoint. The retry (a Ray job's: no overrides) and the run's recorded outcome
    both name the 6-step config's hash, which the run's config_hash tag now holds, not the artifact's 4-step
    one."""
    import mlflow

    from training.runtime.driver import recorded_outcome, resume

    cfg = load_config("tiny", ["train.max_steps=4"])
    longer = load_config("tiny", ["train.max_steps=6"])
    assert longer.hash != cfg.hash
    run_id = make_run(str(tmp_path / "storage"), shards, cfg, config_hash=cfg.hash)
    commit_checkpoint(tmp_path / "storage" / f"train-{run_id}" / "checkpoint_a", step=6, config=longer.to_dict(),
                      frozen=frozen_of(cfg))
    # The resume that asked for 6 steps reached them; its driver died before recording the final checkpoint.
    mlflow.MlflowClient().set_tag(run_id, "config_hash", longer.hash)  # what that resume recorded at its start
    outcome, _ = resume(run_id)  # the retry: no overrides
    assert outcome.config_hash == longer.hash
    assert mlflow.MlflowClient().get_run(run_id).data.tags["config_hash"] == longer.hash
    assert recorded_outcome(run_id) == outcome


def test_storage_nobody_can_write(no_ray, tmp_path, shards):
    """A storage path that cannot be written fails before the MLflow run and before Ray."""
    from data_prep.storage import StorageError
    from training.runtime.driver import train

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError):
        train(load_config("tiny"), str(shards), storage_uri=str(blocker / "ray"))
    assert main(["train", "--data", str(shards), "--storage", str(blocker / "ray"), "--no-register"]) == 2


def test_storage_in_an_unknown_bucket(no_ray, s3_env, shards, capsys):
    assert main(["train", "--data", str(shards), "--storage", "s3://no-such-bucket-ldmflow/runs",
                 "--no-register"]) == 2
    err = capsys.readouterr().err
    assert "no-such-bucket-ldmflow" in err and "Traceback" not in err


def test_config_artifact_is_the_resolved_config(tmp_path, shards):
    """What resume rebuilds the run from: the resolved config JSON, not a path to a preset file."""
    cfg = load_config("tiny", ["train.max_steps=7"])
    run_id = make_run(str(tmp_path / "storage"), shards, cfg)
    import mlflow

    from training.mlops.tracking import CONFIG_ARTIFACT

    run = mlflow.MlflowClient().get_run(run_id)
    saved = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}")
    assert saved["train"]["max_steps"] == 7 and json.dumps(saved, sort_keys=True) == json.dumps(cfg.to_dict(),
                                                                                               sort_keys=True)


def test_changed_data_is_refused_unless_allowed(no_ray, tmp_path, shards):
    """Before, a changed dataset only warned, and the workers followed saved byte offsets into
    rewritten shards."""
    from training.runtime.driver import resume

    cfg = load_config("tiny")
    run_id = make_run(str(tmp_path / "storage"), shards, cfg, dataset_content_id="0" * 64)  # other data then
    commit_checkpoint(tmp_path / "storage" / f"train-{run_id}" / "checkpoint_a", step=4, config=cfg.to_dict(),
                      frozen=frozen_of(cfg))
    message = resume_error(run_id)
    assert "changed since the run started" in message and "--allow-new-data" in message
    with pytest.raises(AssertionError, match="Ray was started"):  # accepted: it goes on to start Ray
        resume(run_id, allow_new_data=True)


def test_allow_new_data_needs_resume(capsys):
    assert main(["train", "--data", "x", "--allow-new-data"]) == 2
    assert "--allow-new-data goes with --resume" in capsys.readouterr().err


def test_a_worker_follows_saved_positions_only_into_the_data_they_were_saved_on():
    import torch

    from training.checkpoint.layout import CheckpointError
    from training.loader.plan import LoaderState, StreamState
    from training.runtime.checkpointing import loader_position
    from training.runtime.context import WorkerContext, WorkerPayload

    cfg = load_config("tiny", ["train.loader_workers=1"])
    positions = [LoaderState(streams=[StreamState(stream=r, streams=2, next_epoch=2, batches=5).to_dict()]).to_dict()
                 for r in range(2)]
    ctx = WorkerContext(rank=1, world_size=2, device=torch.device("cpu"))

    def position(saved_on: str, now: str, allow: bool) -> StreamState:
        payload = WorkerPayload(config=cfg, data="d", frozen={}, run_location="r", dataset_content_id=now,
                                allow_new_data=allow)
        state = loader_position(positions, TrainState(world_size=2, dataset_content_id=saved_on), ctx, payload)
        return StreamState.from_dict(state.streams[0])

    assert position("a", "a", False).batches == 5  # the same data: exactly where it was
    assert position("", "a", False).batches == 5  # a checkpoint from before ids were recorded
    with pytest.raises(CheckpointError, match="--allow-new-data"):
        position("a", "b", False)
    moved = position("a", "b", True)
    assert moved.next_epoch == 3 and moved.batches == 0 and not moved.segments
    assert position("", "b", True).next_epoch == 3
