"""The driver's side of training: `train` (a new MLflow run around a Ray launch) and `resume` (the
same run continued from its latest verified checkpoint). Plain functions: the CLI calls them
directly and the Prefect flows wrap each in a task.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from data_prep import storage
from data_prep.dataset import Dataset, read_dataset
from training.checkpoint.layout import COMMITTED, FILES_DIR, STATE_FILE
from training.checkpoint.loading import model_differences
from training.checkpoint.run_storage import check_run_storage, download_checkpoint, run_uri
from training.checkpoint.verify import CheckpointRef, latest_verified_checkpoint, read_state
from training.config import RunConfig, config_from_dict
from training.errors import ConfigError, DataError, TrackingUnavailable
from training.loader.batch import trains_on_any
from training.loader.latents import check_latents_config, check_latents_frozen, latents_info
from training.locations import runs_dir, setup_mlflow, tracking_uri
from training.mlops.publish import TrainOutcome
from training.mlops.tracking import (
    CONFIG_ARTIFACT,
    STORAGE_TAG,
    cap_http_retries,
    dataset_input,
    ensure_experiment,
    git_commit,
    prefect_flow_run_id,
)
from training.models.assembly import configured_scaling_factor
from training.runtime.cluster import forwarded_credentials, refuse_node_local
from training.runtime.deepspeed_checks import validated_config
from training.runtime.launcher import launch, prepare_cluster
from training.runtime.lease import run_lease
from training.runtime.stopping import TrainingStopped
from training.tasks import frozen_hashes_for

log = logging.getLogger(__name__)


def check_data(cfg: RunConfig, data: str) -> Dataset:
    """Refuse shards that cannot feed this config, before Ray starts. `data` is a dataset folder or
    s3:// prefix (its index.json), or a single part (its manifest.json)."""
    storage.storage_for(data).check_readable(data)
    dataset = read_dataset(data)
    info = latents_info(dataset)
    if info is not None:  # `ldmflow encode`'s latents: made for this config? (the weights: check_frozen_latents)
        te = cfg.model.text_encoder
        check_latents_config(info, where=data, resolution=cfg.model.resolution, task=cfg.task,
                             scaling_factor=configured_scaling_factor(cfg.model.vae),
                             text_encoder={"name_or_path": te.name_or_path, "max_length": te.max_length,
                                           "use_attention_mask": te.use_attention_mask, "tokenizer": te.tokenizer})
    elif dataset.resolution is not None and dataset.resolution != cfg.model.resolution:
        raise DataError(
            f"shards in {data} are {dataset.resolution}px but model.resolution is {cfg.model.resolution}; "
            f"re-shard with --resolution {cfg.model.resolution} or set model.resolution={dataset.resolution}"
        )
    fraction = cfg.validation.holdout_fraction
    if not trains_on_any(dataset, fraction):
        # Every key held out: the training streams would skip sample after sample, forever.
        raise DataError(f"validation.holdout_fraction={fraction} leaves none of the {dataset.total_samples} samples "
                        f"in {data} for training; lower it or add data")
    return dataset


def check_frozen_latents(dataset: Dataset, frozen: dict[str, str]) -> None:
    """Refuse a latent dataset made by other VAE or text encoder weights than `frozen` (the config's,
    frozen_hashes_for); nothing for raw shards."""
    info = latents_info(dataset)
    if info is not None:
        check_latents_frozen(info, frozen, where=dataset.uri)


def _source_content_id(dataset: Dataset) -> str:
    info = latents_info(dataset)
    return dataset.content_id if info is None else info.source_content_id


STORAGE_ENV = "LDMFLOW_STORAGE"


def default_storage() -> str:
    """Where Ray Train keeps runs and checkpoints: LDMFLOW_STORAGE (a shared path or s3://bucket/prefix,
    which every node of a cluster must reach) or, for one machine, <runs dir>/ray."""
    return os.environ.get(STORAGE_ENV) or str(runs_dir() / "ray")


def train(cfg: RunConfig, data_dir: str, *, storage_uri: str | None = None,
          forward_credentials: bool = False, lease_holder: str | None = None,
          on_run: Callable[[str], None] | None = None) -> TrainOutcome:
    """Train `cfg` on the dataset at `data_dir` (local or s3://) inside a new MLflow run; checkpoints
    go to `storage_uri` (default: `default_storage()`); returns the final checkpoint.
    `forward_credentials` hands this environment's S3 and MLflow credentials to every node
    (training.runtime.cluster); otherwise each node uses its own. The run's lease
    (training.runtime.lease) is held by `lease_holder` (default: this process) while it trains;
    `on_run(run_id)` is called once the run exists, before training starts (a Ray job records it)."""
    import mlflow

    # First: credentials in the tracking URI move to the environment before anything (a local Ray,
    # the forwarded variables) copies it, and the URI goes on without them (training.locations).
    uri = setup_mlflow()
    cap_http_retries()
    given = bool(storage_uri or os.environ.get(STORAGE_ENV))
    # Ray reaches the runs through pyarrow, which has no "a//b" keys: Ray and the storage layer then
    # name the same objects only if the root has no empty segments.
    storage_uri = storage.collapse_slashes(storage.absolute(storage_uri or default_storage()))
    data_dir = storage.absolute(data_dir)
    dataset = check_data(cfg, data_dir)
    check_run_storage(storage_uri)  # nobody can write there: one message now, not a failed first checkpoint
    forward = forwarded_credentials() if forward_credentials else None
    frozen = _prepare(cfg, storage_uri, storage_given=given, forward=forward,
                      check=lambda frozen: check_frozen_latents(dataset, frozen))
    experiment_id = ensure_experiment(cfg.tracking.experiment)
    tags = {
        **run_tags(cfg),
        "dataset_content_id": dataset.content_id,
        # The raw data behind it: a latent dataset's source (`ldmflow encode`), else the dataset itself.
        # Retraining compares new raw data with this, however the champion read it.
        "source_content_id": _source_content_id(dataset),
        "preset": cfg.name,
        "task": cfg.task,
        "data": data_dir,
        STORAGE_TAG: storage_uri,
    }
    with tracked_run(experiment_id=experiment_id, run_name=cfg.tracking.run_name, tags=tags,
                     log_system_metrics=True) as run:
        mlflow.log_params({k: _param(v) for k, v in cfg.flat().items()})
        mlflow.log_dict(cfg.to_dict(), CONFIG_ARTIFACT)
        mlflow.log_params({"data.total_samples": dataset.total_samples, "data.shards": len(dataset.shards),
                           "data.parts": len(dataset.parts)})
        log_dataset(dataset)
        if on_run is not None:
            on_run(run.info.run_id)
        # The Ray run is named after the MLflow run, so `--resume RUN_ID` finds its checkpoints again
        # after the driver died (a head pod, a flow worker, a laptop).
        with run_lease(run.info.run_id, holder=lease_holder):
            return _launch_in_run(cfg, data_dir, run.info.run_id, storage_uri, uri, frozen, dataset.content_id,
                                  forward=forward)


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """What every run records of where it came from: the commit, the config hash (over what changes
    training), and the Prefect flow run that started it, when one did."""
    tags = {"git_commit": git_commit(), "config_hash": cfg.hash}
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags["prefect_flow_run_id"] = flow_run
    return tags


def log_dataset(dataset: Dataset) -> None:
    """The dataset as the run's MLflow dataset input."""
    import mlflow

    mlflow.log_input(dataset_input(dataset.uri, dataset.content_id, samples=dataset.total_samples,
                                   shards=len(dataset.shards), parts=len(dataset.parts), skipped=dataset.skipped()),
                     context="training")


def resume(run_id: str, overrides: list[str] | tuple[str, ...] = (), *, allow_new_data: bool = False,
           forward_credentials: bool = False, lease_holder: str | None = None) -> tuple[TrainOutcome, RunConfig]:
    """Continue the MLflow run `run_id` from its latest verified checkpoint in storage (after its
    driver died, or to train further with a higher train.max_steps): same run, steps continuing.

    `overrides` may change how the run continues (train.max_steps, train.num_workers: a different
    worker count resumes through DeepSpeed's universal checkpoint), never what is trained: a model,
    data or objective key is refused. A dataset that changed since (another content id) is refused
    too, unless `allow_new_data`: the run then continues on it from the next epoch.

    A run another live driver is training is refused (training.runtime.lease.LeaseHeld, naming that
    driver and when its lease expires); an expired lease (its driver died) is taken over."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = setup_mlflow()
    cap_http_retries()
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--resume {run_id}: no such MLflow run in {uri}") from None
    tags = run.data.tags
    if STORAGE_TAG not in tags or "data" not in tags:
        raise ConfigError(f"--resume {run_id}: that run was not started by `ldmflow train` (no {STORAGE_TAG} tag)")
    base = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}")
    for text in overrides:
        key = text.partition("=")[0].strip()
        if not resumable(key):
            raise ConfigError(f"--resume {run_id}: `{key}` cannot change on resume (allowed: "
                              f"{', '.join(sorted(RESUMABLE_KEYS))}, gate.* and serving.*); start a new run to "
                              "change it")
    cfg = config_from_dict(base, list(overrides))
    storage_uri, data_dir = tags[STORAGE_TAG], tags["data"]
    location = run_uri(storage_uri, ray_run_name(run_id))
    latest = latest_verified_checkpoint(location)
    if latest is None:
        raise ConfigError(f"--resume {run_id}: no verified checkpoint under {location}; "
                          "the run never finished one, so start it again as a new run")
    if latest.step >= cfg.train.max_steps:
        if tags.get("checkpoint") == latest.uri:  # the run finished and recorded this as its outcome
            raise ConfigError(f"--resume {run_id}: its latest checkpoint is at step {latest.step}, which already "
                              f"reaches train.max_steps={cfg.train.max_steps}; pass --max-steps to train further")
        # Training reached its end but its driver stopped before recording it (killed between the final
        # checkpoint and the run's end): finish the run from that checkpoint; training again would refuse.
        with run_lease(run_id, holder=lease_holder):
            return _finish_from(run_id, latest, _run_config_hash(cfg, tags, overrides), tags, data_dir), cfg
    dataset = check_data(cfg, data_dir)
    new_data = _changed_data(run_id, tags, dataset, allow_new_data)
    check_run_storage(storage_uri)
    forward = forwarded_credentials() if forward_credentials else None
    # Before Ray starts: a run another driver is training is refused here, in one line.
    with run_lease(run_id, holder=lease_holder):
        # The run's storage was chosen when it started; workers check that they share it (preflight).
        frozen = _prepare(cfg, storage_uri, storage_given=True, forward=forward,
                          check=lambda frozen: _check_resume_models(dataset, latest.uri, cfg, frozen))
        log.info("resuming MLflow run %s from step %d (%s)", run_id, latest.step, latest.uri)
        with tracked_run(run_id=run_id, log_system_metrics=True):
            resumes = int(tags.get("resumes", "0")) + 1
            mlflow.set_tags({"resumes": str(resumes), f"resume.{resumes}.from_step": str(latest.step),
                             f"resume.{resumes}.overrides": " ".join(overrides) or "-",
                             "config_hash": _run_config_hash(cfg, tags, overrides)})
            content_id = tags.get("dataset_content_id", "")
            if new_data:
                mlflow.set_tags({f"resume.{resumes}.new_data": f"{content_id} -> {new_data}",
                                 "dataset_content_id": new_data})
                content_id = new_data
                log_dataset(dataset)
            flow_run = prefect_flow_run_id()
            if flow_run:
                mlflow.set_tag(f"resume.{resumes}.prefect_flow_run_id", flow_run)
            # The workers find the run's latest verified checkpoint themselves (the one checked above,
            # unless a later one appeared meanwhile).
            outcome = _launch_in_run(cfg, data_dir, run_id, storage_uri, uri, frozen, content_id,
                                     allow_new_data=bool(new_data), forward=forward)
    return outcome, cfg


def _check_resume_models(dataset: Dataset, checkpoint_uri: str, cfg: RunConfig, frozen: dict) -> None:
    check_frozen_latents(dataset, frozen)
    check_resumable(checkpoint_uri, cfg, frozen)


def _run_config_hash(cfg: RunConfig, tags: dict, overrides) -> str:
    """The config hash a resumed run trains under: its `config_hash` tag (set at the start, and by every
    resume that changed it, e.g. a higher train.max_steps), or the resumed config's where this resume's
    overrides set one. A retried job resumes without overrides: it keeps the hash the run last recorded,
    where the run's config artifact alone would give the hash from before those resumes."""
    if overrides or not tags.get("config_hash"):
        return cfg.hash
    return tags["config_hash"]


def recorded_outcome(run_id: str) -> TrainOutcome | None:
    """The outcome of MLflow run `run_id` when it finished and recorded its final checkpoint (None
    otherwise): what a retried Ray job publishes when its predecessor ended the run but was killed before
    publishing, instead of resuming a run that has nothing left to train."""
    import mlflow

    setup_mlflow()
    run = mlflow.MlflowClient().get_run(run_id)
    tags = run.data.tags
    if run.info.status != "FINISHED" or not tags.get("checkpoint"):
        return None
    cfg = config_from_dict(mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}"))
    return TrainOutcome(run_id=run_id, checkpoint_dir=tags["checkpoint"], metrics=dict(run.data.metrics),
                        dataset_content_id=tags.get("dataset_content_id", ""),
                        config_hash=_run_config_hash(cfg, tags, ()), data=tags.get("data", ""))


def _finish_from(run_id: str, final: CheckpointRef, config_hash: str, tags: dict, data_dir: str) -> TrainOutcome:
    """The outcome of a run whose final checkpoint is complete but was never recorded: the run is marked
    finished with that checkpoint, its metrics are the last it logged."""
    import mlflow

    log.info("MLflow run %s: its step-%d checkpoint %s is complete but the run never recorded it; finishing the "
             "run from it", run_id, final.step, final.uri)
    with tracked_run(run_id=run_id):
        resumes = int(tags.get("resumes", "0")) + 1
        mlflow.set_tags({"resumes": str(resumes), f"resume.{resumes}.from_step": str(final.step),
                         f"resume.{resumes}.finished_from_checkpoint": "true", "checkpoint": final.uri,
                         "config_hash": config_hash})
        metrics = dict(mlflow.MlflowClient().get_run(run_id).data.metrics)
    return TrainOutcome(run_id=run_id, checkpoint_dir=final.uri, metrics=metrics,
                        dataset_content_id=tags.get("dataset_content_id", ""), config_hash=config_hash, data=data_dir)


def _changed_data(run_id: str, tags: dict, dataset: Dataset, allow_new_data: bool) -> str:
    """The dataset's new content id when it changed since the run started ("" when it did not): the
    saved loader positions are byte offsets into the old shards, so following them into rewritten
    ones would read the wrong samples. Refused unless `allow_new_data`."""
    was = tags.get("dataset_content_id", "")
    if dataset.content_id == was:
        return ""
    if not allow_new_data:
        raise ConfigError(f"--resume {run_id}: the dataset at {dataset.uri} changed since the run started (content "
                          f"id {dataset.content_id[:12]}, was {was[:12] or 'unknown'}); its saved positions point into "
                          "the old shards. Pass --allow-new-data to continue on it from the next epoch, or start a "
                          "new run")
    log.info("run %s continues on the changed dataset %s from the next epoch", run_id, dataset.uri)
    return dataset.content_id


def check_resumable(checkpoint_uri: str, cfg: RunConfig, frozen: dict) -> None:
    """Refuse, before any worker starts, a checkpoint of another model: a different UNet, VAE or
    text encoder config, or frozen VAE/text weights that changed since (a model path whose files
    were replaced). Reads only the checkpoint's small state files."""

    def small(rel: str) -> bool:
        return rel in (COMMITTED, STATE_FILE) or rel.startswith(FILES_DIR + "/")

    with tempfile.TemporaryDirectory(prefix="ldm-resume-") as tmp:
        saved = read_state(download_checkpoint(checkpoint_uri, Path(tmp), only=small), only=lambda rel: False)
    differ = model_differences(saved, cfg.to_dict()["model"])
    if differ:
        raise ConfigError(f"checkpoint {checkpoint_uri} is of a different model than the config ({', '.join(differ)} "
                          "differ); resume it with the config it was trained with")
    changed = sorted(k for k in set(saved.frozen) | set(frozen) if saved.frozen.get(k) != frozen.get(k))
    if changed:
        raise ConfigError(f"checkpoint {checkpoint_uri} was trained against other {' and '.join(changed)} weights than "
                          "the ones loaded now: the model files at the configured paths changed since")


RESUMABLE_KEYS = frozenset({"train.max_steps", "train.num_workers", "train.min_workers", "train.cpus_per_worker",
                            "train.max_failures", "train.checkpoint_every", "train.log_every",
                            "train.checkpoints_to_keep", "train.loader_workers", "train.checkpoint_upload",
                            "train.max_pending_uploads",
                            "train.cluster_wait_s"})
"""Config keys `resume` may change: how and how long the run continues, not what it trains."""
RESUMABLE_SECTIONS = ("gate", "serving")
"""Sections `resume` may change whole: what happens to the model after training (its promotion, its
request limits), which the run's checkpoints do not depend on."""


def resumable(key: str) -> bool:
    return key in RESUMABLE_KEYS or key.split(".", 1)[0] in RESUMABLE_SECTIONS



def ray_run_name(run_id: str) -> str:
    return f"train-{run_id}"


def _prepare(cfg: RunConfig, storage_uri: str, *, storage_given: bool, forward: dict[str, str] | None,
             check=None) -> dict:
    """Load the frozen models and join or start Ray: every error they raise comes before a run exists
    or a worker starts. `check(frozen_hashes)` runs in between (resume's model check)."""

    validated_config(cfg.train)  # an option DeepSpeed's config models refuse fails here (NVMe: the workers' pre-flight)
    frozen = frozen_hashes_for(cfg)  # a wrong model path fails here
    if check is not None:
        check(frozen)
    prepare_cluster(cfg, forward)  # and a request Ray cannot place fails here
    # So does a cluster of several nodes with a storage folder or tracking store only this one has.
    refuse_node_local(storage_uri, storage_given=storage_given, tracking_uri=tracking_uri())
    return frozen


def _launch_in_run(cfg: RunConfig, data_dir: str, run_id: str, storage_uri: str, tracking: str, frozen: dict,
                   content_id: str, *, allow_new_data: bool = False,
                   forward: dict[str, str] | None = None) -> TrainOutcome:
    import mlflow

    result = launch(cfg, data_dir, storage_uri=storage_uri, name=ray_run_name(run_id), mlflow_run_id=run_id,
                    tracking_uri=tracking, frozen=frozen, dataset_content_id=content_id,
                    allow_new_data=allow_new_data, forward_env=forward)
    when_reachable(lambda: mlflow.set_tag("checkpoint", result.checkpoint),
                   f"training finished (final checkpoint {result.checkpoint}) but MLflow run {run_id} could "
                   "not be marked finished and nothing was registered")
    return TrainOutcome(run_id=run_id, checkpoint_dir=result.checkpoint, metrics=result.metrics,
                        dataset_content_id=content_id, config_hash=cfg.hash, data=data_dir)


FINAL_WRITE_S = 120.0
"""How long the driver keeps trying its writes after training (the checkpoint tag, the run's end)."""
STOP_WRITE_S = 10.0
"""The same after a stop, whose grace (training.runtime.stopping.STOP_MARGIN_S left of it) must also
cover the lease's release."""


def when_reachable(write, failed: str, within_s: float | None = None):
    """`write()`, retried with back-off while the tracking server is down or failing (5xx, no
    connection) for up to `within_s`: training rides out an outage (the workers buffer), and the
    outage may not be over when it ends. Then TrackingUnavailable, whose message starts with `failed`."""
    from mlflow.exceptions import MlflowException

    within_s = FINAL_WRITE_S if within_s is None else within_s
    deadline, delay = time.monotonic() + within_s, 1.0
    while True:
        try:
            return write()
        except MlflowException as e:
            if e.get_http_status_code() < 500:
                raise
            if time.monotonic() + delay > deadline:
                raise TrackingUnavailable(f"{failed}: the MLflow server at {tracking_uri()} did not answer for "
                                          f"{within_s:.0f} s ({str(e).splitlines()[0][:200]})") from None
            log.warning("MLflow server unreachable; retrying in %.0f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


@contextmanager
def tracked_run(**start_run_args):
    """mlflow.start_run, whose end waits out an outage like when_reachable; a TrackingUnavailable
    from inside stays the error raised, not the failed end_run it would lead to."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run = mlflow.start_run(**start_run_args)
    run_id = run.info.run_id

    def end(status: str, failed: str, within_s: float | None = None) -> None:
        # mlflow.end_run forgets the active run before its request, so retrying it would retry nothing:
        # mark the run first (retried), then end it (the same request, now answered).
        when_reachable(lambda: mlflow.MlflowClient().set_terminated(run_id, status), failed, within_s)
        mlflow.end_run(status)

    try:
        yield run
    except TrackingUnavailable:
        try:
            mlflow.end_run("FAILED")
        except MlflowException:
            pass  # still down: the run stays RUNNING on the server, as the message says
        raise
    except TrainingStopped as stopped:
        # MLflow's status for a run a user ended; the tag says where --resume continues from.
        at = str(stopped.step) if stopped.step is not None else "no checkpoint"
        when_reachable(lambda: mlflow.MlflowClient().set_tag(run_id, "stopped_at_step", at),
                       "the run was stopped and could not be tagged", within_s=STOP_WRITE_S)
        end("KILLED", "the run was stopped and could not be marked KILLED", within_s=STOP_WRITE_S)
        raise
    except BaseException:
        end("FAILED", "the run failed and could not be marked FAILED")
        raise
    end("FINISHED", "training finished but the run could not be marked FINISHED")


def _param(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]  # MLflow's param value limit
