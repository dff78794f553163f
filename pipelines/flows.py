"""Prefect flows: orchestration only. Each task calls one library function (pipelines/tasks.py), so
the same code runs with or without Prefect.

    shard_flow        source -> a new part of a dataset (only what the dataset does not hold)
    encode_flow       dataset -> its latent dataset (`ldmflow encode`) for a config's frozen VAE and text
                      encoder; train_flow, retrain_flow and ldm_pipeline insert this step with `latents`
    train_vae_flow    dataset -> the first-stage VAE (a diffusers folder, logged to its run)
    train_flow        dataset -> an MLflow run -> a registered version (and the gate, if asked)
    evaluate_flow     a model version -> caption adherence, recorded on its run and version
    register_flow     a finished MLflow run -> a registered version (and the gate, if asked)
    retrain_flow      new data? -> shard what is new -> train (from the champion) -> register
                      -> evaluate -> the gate; one at a time per model
    ldm_pipeline      (synthetic data) -> shard -> (VAE) -> LDM -> register -> gate: the demo's chain
    batch_generate_flow   prompts -> images from a registered model

Parameters are typed (pipelines/params.py): Prefect validates them when the flow run starts, and each
flow resolves its config and checks its storage URIs in its first lines, so a bad parameter fails
the run before any work, naming it. Each flow run publishes a markdown artifact (pipelines/reports.py).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import pipelines.prefect_setup  # noqa: F401  (PREFECT_HOME before Prefect is imported)

# isort: split
from prefect import flow, get_run_logger
from pydantic import Field

from data_prep import storage
from pipelines.params import (
    ConfigPath,
    ModelUri,
    NonNegativeInt,
    Override,
    PositiveInt,
    Seconds,
    StorageUri,
    WaitSeconds,
    check_output,
    check_source,
    run_config,
)

# Imported under another name: every flow has a `result_storage` parameter, which would shadow it
# (ldm_pipeline's VAE step once called the parameter instead).
from pipelines.policies import result_storage as result_storage_for
from pipelines.reports import metric_rows, mlflow_links, publish_report
from pipelines.retrain_lock import retrain_slot
from pipelines.tasks import (
    EncodeSummary,
    ShardSummary,
    batch_generate_task,
    champion_task,
    encode_task,
    evaluate_task,
    frozen_task,
    gate_task,
    publish_task,
    shard_task,
    stop_training_jobs,
    synth_task,
    task_timeout,
    train_task,
    train_vae_task,
)
from training.config import RunConfig, config_from_dict
from training.eval.gate import Decision
from training.locations import runs_dir
from training.mlops.publish import PublishedVAE, TrainOutcome
from training.mlops.registry import CANDIDATE, RegisteredVersion

HOUR = 3600.0
Retries = Annotated[int, Field(ge=0, le=10)]
TRAIN_METRICS = ("loss", "val_loss", "val_psnr", "samples_per_sec")
EVAL_METRICS = ("colour_adherence", "shape_adherence", "background_adherence", "seen_shape_adherence")


# --- steps the flows share ----------------------------------------------------------------------


def _shard(source: str, output: str, resolution: int, samples_per_shard: int | None, overwrite: bool,
           timeout_s: float) -> ShardSummary:
    return shard_task.with_options(timeout_seconds=timeout_s)(source, output, resolution, samples_per_shard,
                                                              overwrite)


def _encode(cfg: RunConfig, data: str, content_id: str, latents_dir: str, *, workers: int | None, timeout_s: float,
            retries: int, result_storage_uri: str | None, refresh_cache: bool = False,
            batch_size: int = 64) -> EncodeSummary:
    """The raw dataset -> its latents for `cfg`'s frozen encoders, under `latents_dir`; cached on (the
    raw dataset's content id, the VAE and text encoder weights' hashes, the encoding config), so a
    rerun with the same data and encoders reuses them, and new weights under an old path encode again."""
    frozen = frozen_task.with_options(timeout_seconds=timeout_s)(cfg)
    options = {"timeout_seconds": timeout_s, "retries": retries, "refresh_cache": refresh_cache,
               "result_storage": result_storage_for(result_storage_uri)}
    return encode_task.with_options(**options)(cfg, data, content_id, frozen, latents_dir, workers, batch_size)


def _latents_dir(param: str, value: str | None, data: str) -> str:
    """Where a flow keeps latent datasets: `value`, else <runs dir>/latents beside local data. Data on S3
    needs it named: a local default would be a folder the Ray nodes cannot read."""
    if value is not None:
        return check_output(param, value)
    if storage.is_s3(data):
        from training.errors import ConfigError

        raise ConfigError(f"flow parameter `{param}`: required when the data is on S3 ({data}); give an s3:// prefix "
                          "every Ray node can read")
    return check_output(param, str(runs_dir() / "latents"))


def _latents_rows(latents: EncodeSummary) -> list[tuple[str, object]]:
    return [("latent dataset", latents.output), ("latent samples", latents.samples),
            ("latent shards encoded now", latents.encoded), ("latent shards reused", latents.kept),
            ("latent dataset content id", latents.content_id[:16])]


def _run_training(training_task, cfg: RunConfig, data: str, content_id: str, *, timeout_s: float, retries: int,
                  result_storage_uri: str | None, forward_credentials: bool, refresh_cache: bool = False):
    """A training task (train_task or train_vae_task), cached on (config hash, dataset content id) in
    result storage every worker reaches; `refresh_cache` trains again anyway (and replaces the cached
    result). The job's own timeout is `timeout_s`; Prefect's is a backstop past it."""
    options = {"timeout_seconds": task_timeout(timeout_s), "retries": retries,
               "result_storage": result_storage_for(result_storage_uri), "refresh_cache": refresh_cache}
    return training_task.with_options(**options)(cfg, data, content_id, forward_credentials, timeout_s)


def _train(cfg: RunConfig, data: str, content_id: str, **options) -> TrainOutcome:
    return _run_training(train_task, cfg, data, content_id, **options)


def _train_vae(cfg: RunConfig, data: str, content_id: str, **options) -> PublishedVAE:
    return _run_training(train_vae_task, cfg, data, content_id, **options)


def _evaluate(version: RegisteredVersion, prompts: int, per_prompt: int, steps: int | None, seed: int, *,
              timeout_s: float, result_storage_uri: str | None) -> dict:
    options = {"timeout_seconds": timeout_s, "result_storage": result_storage_for(result_storage_uri)}
    return evaluate_task.with_options(**options)(version.uri, prompts, per_prompt, steps, seed)


def _gate(cfg: RunConfig, version: RegisteredVersion, timeout_s: float) -> Decision:
    return gate_task.with_options(timeout_seconds=timeout_s)(cfg, version)


def _gate_summary(decision: Decision) -> dict:
    return {"promoted": decision.promoted, "reason": decision.reason, "candidate": decision.candidate,
            "champion_version": decision.champion_version, "champion": decision.champion}


def _model_rows(version: RegisteredVersion | None, decision: Decision | None) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    if version is not None:
        rows.append(("registered", f"{version.name} v{version.version} (alias {CANDIDATE})"))
    if decision is not None:
        rows.append(("gate", f"{'promoted to champion' if decision.promoted else 'not promoted'}: {decision.reason}"))
    return rows


def _shard_rows(shards: ShardSummary) -> list[tuple[str, object]]:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(shards.skipped.items()) if v) or "none"
    return [("samples written", shards.written), ("already in the dataset", shards.existing),
            ("skipped", skipped), ("dataset samples", shards.samples), ("dataset content id", shards.content_id[:16])]


def _with_champion_init(cfg: RunConfig, model: str, version: str) -> RunConfig:
    """`cfg` fine-tuning from champion version `version`: its UNet as the init, and the VAE it was
    trained with (the latents its UNet knows). Pinned to the version, not the alias, so the config
    hash (and the training cache) changes when the champion does."""
    uri = f"models:/{model}/{version}"
    return config_from_dict(cfg.to_dict(), [f"model.unet.pretrained={uri}", f"model.vae.pretrained={uri}"])


# --- flows ----------------------------------------------------------------------------------------


@flow(name="ldm-shard", log_prints=True)
def shard_flow(source: StorageUri, output: StorageUri, resolution: PositiveInt = 64,
               samples_per_shard: PositiveInt | None = None, overwrite: bool = False,
               timeout_s: Seconds = 6 * HOUR) -> dict:
    """Images + captions -> a new part of the dataset at `output` holding only what it lacks (by content).
    `samples_per_shard` None: the shard config's sizing (1000 samples or 1 GiB per tar)."""
    source, output = check_source("source", source), check_output("output", output)
    shards = _shard(source, output, resolution, samples_per_shard, overwrite, timeout_s)
    publish_report("ldm-shard-report", f"shard {source} -> {output}", _shard_rows(shards))
    return asdict(shards)


@flow(name="ldm-encode", log_prints=True)
def encode_flow(data: StorageUri, latents_dir: StorageUri, config: ConfigPath = "tiny",
                overrides: list[Override] | None = None, workers: NonNegativeInt | None = None,
                batch_size: PositiveInt = 64, timeout_s: Seconds = 6 * HOUR, retries: Retries = 1,
                result_storage: StorageUri | None = None, refresh_cache: bool = False) -> dict:
    """Dataset -> its latent dataset under `latents_dir` (<latents_dir>/<encoding id>) for the frozen VAE
    and text encoder of `config` (the `ldm` config that will train on them); `ldmflow train` or
    train_flow then reads them as `data`. `workers` Ray actors (None: the config's train.num_workers; 0:
    in the flow's process). Cached on the raw data's content id, the encoders' weights and config and
    `latents_dir`; never on the raw data's path."""
    cfg = run_config("config", config, overrides, task="ldm")
    data = check_source("data", data)
    content_id = _content_id("data", data)
    latents = _encode(cfg, data, content_id, check_output("latents_dir", latents_dir), workers=workers,
                      timeout_s=timeout_s, retries=retries, result_storage_uri=_storage_uri(result_storage),
                      refresh_cache=refresh_cache, batch_size=batch_size)
    publish_report("ldm-encode-report", f"{data} encoded for {cfg.name}",
                   [("dataset content id", content_id[:16]), *_latents_rows(latents)])
    return asdict(latents)


@flow(name="ldm-train-vae", log_prints=True, on_cancellation=[stop_training_jobs])
def train_vae_flow(data: StorageUri, config: ConfigPath = "shapes-vae", overrides: list[Override] | None = None,
                   timeout_s: Seconds = 48 * HOUR, retries: Retries = 1, result_storage: StorageUri | None = None,
                   forward_credentials: bool = False) -> dict:
    """Dataset -> the first-stage VAE: a diffusers folder with its data's latent scaling, logged to its run."""
    cfg = run_config("config", config, overrides, task="vae")
    data = check_source("data", data)
    content_id = _content_id("data", data)
    vae = _train_vae(cfg, data, content_id, timeout_s=timeout_s, retries=retries,
                     result_storage_uri=_storage_uri(result_storage), forward_credentials=forward_credentials)
    publish_report("ldm-train-vae-report", f"VAE trained on {data}",
                   [("scaling factor", vae.scaling_factor), ("held-out PSNR (dB)", vae.psnr), ("folder", vae.path)],
                   links=mlflow_links(vae.run_id))
    return asdict(vae)


@flow(name="ldm-train", log_prints=True, on_cancellation=[stop_training_jobs])
def train_flow(data: StorageUri, config: ConfigPath = "tiny", overrides: list[Override] | None = None,
               init_from: ModelUri | None = None, promote: bool = False, timeout_s: Seconds = 7 * 24 * HOUR,
               retries: Retries = 1, gate_timeout_s: Seconds = 2 * HOUR, result_storage: StorageUri | None = None,
               forward_credentials: bool = False, refresh_cache: bool = False, latents: bool = False,
               latents_dir: StorageUri | None = None, encode_workers: NonNegativeInt | None = None,
               encode_timeout_s: Seconds = 6 * HOUR) -> dict:
    """Dataset -> Ray/DeepSpeed training -> MLflow run -> registered version (alias candidate) -> the gate
    when `promote`. `init_from` (models:/NAME/VERSION or a pipeline folder) starts the UNet and VAE
    from that model. Cached: the same config on the same data trains once (`refresh_cache` trains again).
    `latents`: encode the dataset first (encode_flow's step, under `latents_dir`, default <runs dir>/latents
    for local data; `encode_workers` as its `workers`) and train from the latent shards."""
    cfg = run_config("config", config, overrides, task="ldm")
    data = check_source("data", data)
    if init_from:
        cfg = config_from_dict(cfg.to_dict(), [f"model.unet.pretrained={init_from}",
                                               f"model.vae.pretrained={init_from}"])
    latents_root = _latents_dir("latents_dir", latents_dir, data) if latents else None
    content_id = _content_id("data", data)
    storage_uri = _storage_uri(result_storage)
    rows: list[tuple[str, object]] = [("dataset content id", content_id[:16])]
    result: dict = {}
    train_data, train_id = data, content_id
    if latents_root is not None:
        encoded = _encode(cfg, data, content_id, latents_root, workers=encode_workers, timeout_s=encode_timeout_s,
                          retries=retries, result_storage_uri=storage_uri, refresh_cache=refresh_cache)
        train_data, train_id = encoded.output, encoded.content_id
        rows += _latents_rows(encoded)
        result["latents"] = asdict(encoded)
    outcome = _train(cfg, train_data, train_id, timeout_s=timeout_s, retries=retries, result_storage_uri=storage_uri,
                     forward_credentials=forward_credentials, refresh_cache=refresh_cache)
    version = publish_task(cfg, outcome)
    decision = _gate(cfg, version, gate_timeout_s) if promote else None
    publish_report("ldm-train-report", f"{cfg.name} trained on {train_data}",
                   [*rows, ("config hash", cfg.hash[:16]),
                    *metric_rows(outcome.metrics, TRAIN_METRICS), *_model_rows(version, decision)],
                   links=mlflow_links(outcome.run_id, version.name, version.version))
    return {**result, "run_id": outcome.run_id, "metrics": outcome.metrics, "model": _model(version, decision)}


@flow(name="ldm-evaluate", log_prints=True)
def evaluate_flow(model: ModelUri, prompts: PositiveInt = 12, per_prompt: PositiveInt = 4,
                  steps: PositiveInt | None = None, seed: int = 0, timeout_s: Seconds = 2 * HOUR,
                  result_storage: StorageUri | None = None) -> dict:
    """Caption adherence of `model` on held-out and seen prompts, recorded on its MLflow run and version.
    An alias is pinned to its version first (the cache key, and what is recorded)."""
    version = _pinned(model)
    result = _evaluate(version, prompts, per_prompt, steps, seed, timeout_s=timeout_s,
                       result_storage_uri=_storage_uri(result_storage))
    publish_report("ldm-evaluate-report", f"evaluation of {version.uri}",
                   [("evaluation set", result["eval_set_id"]), *metric_rows(result["metrics"], EVAL_METRICS)],
                   links=mlflow_links(version.run_id or None, version.name, version.version))
    return {"model": version.uri, **result}


@flow(name="ldm-register", log_prints=True)
def register_flow(run_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")], promote: bool = False,
                  gate_timeout_s: Seconds = 2 * HOUR) -> dict:
    """A finished training run -> its pipeline exported and registered (once per run and model name);
    the gate (its config's `gate:`) when `promote`."""
    from pipelines.run_lookup import outcome_of_run

    outcome, cfg = outcome_of_run(run_id)
    version = publish_task(cfg, outcome)
    decision = _gate(cfg, version, gate_timeout_s) if promote else None
    publish_report("ldm-register-report", f"run {run_id} registered",
                   [*metric_rows(outcome.metrics, TRAIN_METRICS), *_model_rows(version, decision)],
                   links=mlflow_links(run_id, version.name, version.version))
    return {"run_id": run_id, "model": _model(version, decision)}


@flow(name="ldm-retrain", log_prints=True, on_cancellation=[stop_training_jobs])
def retrain_flow(source: StorageUri, dataset: StorageUri, config: ConfigPath = "tiny",
                 overrides: list[Override] | None = None, from_champion: bool = True,
                 samples_per_shard: PositiveInt | None = None, evaluate: bool = True, eval_prompts: PositiveInt = 12,
                 eval_per_prompt: PositiveInt = 4, eval_steps: PositiveInt | None = None, promote: bool = True,
                 lock_wait_s: WaitSeconds | None = 0, shard_timeout_s: Seconds = 6 * HOUR,
                 train_timeout_s: Seconds = 7 * 24 * HOUR, eval_timeout_s: Seconds = 2 * HOUR,
                 train_retries: Retries = 1, result_storage: StorageUri | None = None,
                 forward_credentials: bool = False, latents: bool = False, latents_dir: StorageUri | None = None,
                 encode_workers: NonNegativeInt | None = None) -> dict:
    """New data in `source`? -> shard only what `dataset` lacks (a new part) -> train from the current
    champion (`from_champion`; from scratch otherwise or when there is none) -> register -> evaluate
    -> the gate. When the dataset is the one the champion was trained on, nothing is trained.
    `latents`: encode the dataset with the VAE training starts from (the champion's, or the config's)
    under `latents_dir` (as train_flow) and train from the latent shards.

    One retrain per model at a time (tracking.model_name): a second one is refused at once
    (`lock_wait_s` 0), waits that long, or waits as long as it takes (None)."""
    cfg = run_config("config", config, overrides, task="ldm")
    source, dataset = check_source("source", source), check_output("dataset", dataset)
    latents_root = _latents_dir("latents_dir", latents_dir, dataset) if latents else None
    storage_uri = _storage_uri(result_storage)
    model = cfg.tracking.model_name
    log = get_run_logger()
    with retrain_slot(model, wait_s=lock_wait_s):
        shards = _shard(source, dataset, cfg.model.resolution, samples_per_shard, False, shard_timeout_s)
        champion = champion_task(model)
        rows = _shard_rows(shards)
        if champion is not None and champion.trained_on(shards.content_id):
            message = (f"nothing new: {dataset} holds what {model} v{champion.version} (champion) was trained on "
                       f"({shards.samples} samples); nothing trained")
            log.info(message)
            publish_report("ldm-retrain-report", f"retrain {model}: nothing new",
                           [*rows, ("champion", f"v{champion.version}"), ("trained", "nothing")],
                           links=mlflow_links(None, model, champion.version), notes=[message])
            return {"trained": False, "reason": message, "shards": asdict(shards), "champion": champion.version}
        init = champion.version if (from_champion and champion is not None) else None
        if init is not None:
            cfg = _with_champion_init(cfg, model, init)
        log.info("training %s on %s (%d samples, %d new) from %s", model, dataset, shards.samples, shards.written,
                 f"champion v{init}" if init else "scratch")
        train_data, train_id, encoded = dataset, shards.content_id, None
        if latents_root is not None:
            encoded = _encode(cfg, dataset, shards.content_id, latents_root, workers=encode_workers,
                              timeout_s=shard_timeout_s, retries=train_retries, result_storage_uri=storage_uri)
            train_data, train_id = encoded.output, encoded.content_id
            rows += _latents_rows(encoded)
        outcome = _train(cfg, train_data, train_id, timeout_s=train_timeout_s, retries=train_retries,
                         result_storage_uri=storage_uri, forward_credentials=forward_credentials)
        version = publish_task(cfg, outcome)
        evaluation = _evaluate(version, eval_prompts, eval_per_prompt, eval_steps, cfg.gate.seed,
                               timeout_s=eval_timeout_s, result_storage_uri=storage_uri) if evaluate else None
        decision = _gate(cfg, version, eval_timeout_s) if promote else None
    rows += [("initialised from", f"{model} v{init}" if init else "scratch"), ("config hash", cfg.hash[:16]),
             *metric_rows(outcome.metrics, TRAIN_METRICS)]
    if evaluation is not None:
        rows += metric_rows(evaluation["metrics"], EVAL_METRICS, "eval ")
    publish_report("ldm-retrain-report", f"retrain {model}: v{version.version}", [*rows, *_model_rows(version, decision)],
                   links=mlflow_links(outcome.run_id, version.name, version.version))
    return {"trained": True, "init": init, "shards": asdict(shards),
            "latents": asdict(encoded) if encoded is not None else None, "run_id": outcome.run_id,
            "metrics": outcome.metrics, "evaluation": evaluation, "model": _model(version, decision)}


@flow(name="ldm-train-pipeline", log_prints=True, on_cancellation=[stop_training_jobs])
def ldm_pipeline(config_path: ConfigPath = "configs/tiny.yaml", overrides: list[Override] | None = None,
                 source: StorageUri | None = None, synth_n: PositiveInt = 64, work_dir: StorageUri | None = None,
                 samples_per_shard: PositiveInt | None = None, overwrite_shards: bool = False,
                 vae_config_path: ConfigPath | None = None, vae_overrides: list[Override] | None = None,
                 forward_credentials: bool = False, promote: bool = True, shard_timeout_s: Seconds = 6 * HOUR,
                 train_timeout_s: Seconds = 7 * 24 * HOUR, gate_timeout_s: Seconds = 2 * HOUR,
                 train_retries: Retries = 1, result_storage: StorageUri | None = None,
                 refresh_cache: bool = False, latents: bool = False, encode_workers: NonNegativeInt | None = None
                 ) -> dict:
    """(synthetic data) -> shards -> (VAE training) -> (encode) -> Ray/DeepSpeed LDM training -> MLflow registration.

    With `vae_config_path` (a `task: vae` config) the first stage is trained on the same shards
    first and the LDM is trained on it (model.vae.pretrained set to the exported folder). Returns
    plain data (what `ldmflow flow` prints): the shards, the VAE, the run and the model version.
    `work_dir` (default <runs dir>/work) holds the synthetic images and the shards.
    `samples_per_shard` None: the shard config's sizing (1000 samples or 1 GiB per tar).
    `forward_credentials` hands the training tasks' S3/MLflow credentials to every Ray node.
    `promote`: run the gate (config.gate) on the new version, which may make it `champion`.
    Training is cached on (config hash, dataset content id): the same data and config train once;
    `refresh_cache` trains again.
    `latents`: once the VAE is known (trained here or the config's), encode the shards into
    <work_dir>/latents (encode_flow's step; `encode_workers` as its `workers`) and train the LDM from them."""
    overrides = list(overrides or [])
    cfg = run_config("config_path", config_path, overrides, task="ldm")
    vae_cfg = run_config("vae_config_path", vae_config_path, vae_overrides, task="vae") if vae_config_path else None
    if vae_cfg is not None and vae_cfg.model.resolution != cfg.model.resolution:
        raise ValueError(f"{vae_config_path} trains at {vae_cfg.model.resolution}px but {config_path} at "
                         f"{cfg.model.resolution}px")
    # Raw data and shards of a demo run: local, under the runs folder unless told otherwise.
    work = check_output("work_dir", storage.local_path(work_dir) if work_dir else str(runs_dir() / "work"))
    source = check_source("source", source) if source is not None else None
    storage_uri = _storage_uri(result_storage)
    if source is None:
        source = synth_task(storage.join(work, "raw"), synth_n, cfg.train.seed, cfg.model.resolution)
    shards = _shard(source, storage.join(work, "shards"), cfg.model.resolution, samples_per_shard, overwrite_shards,
                    shard_timeout_s)
    result: dict = {"shards": asdict(shards)}
    rows = _shard_rows(shards)
    if vae_cfg is not None:
        vae = _train_vae(vae_cfg, shards.output, shards.content_id, timeout_s=train_timeout_s, retries=train_retries,
                         result_storage_uri=storage_uri, forward_credentials=forward_credentials,
                         refresh_cache=refresh_cache)
        result["vae"] = asdict(vae)
        rows += [("VAE held-out PSNR (dB)", vae.psnr), ("VAE scaling factor", vae.scaling_factor)]
        cfg = config_from_dict(cfg.to_dict(), [f"model.vae.pretrained={vae.path}"])
    train_data, train_id = shards.output, shards.content_id
    if latents:
        encoded = _encode(cfg, shards.output, shards.content_id, storage.join(work, "latents"), workers=encode_workers,
                          timeout_s=shard_timeout_s, retries=train_retries, result_storage_uri=storage_uri,
                          refresh_cache=refresh_cache)
        train_data, train_id = encoded.output, encoded.content_id
        result["latents"] = asdict(encoded)
        rows += _latents_rows(encoded)
    outcome = _train(cfg, train_data, train_id, timeout_s=train_timeout_s, retries=train_retries,
                     result_storage_uri=storage_uri, forward_credentials=forward_credentials, refresh_cache=refresh_cache)
    version = publish_task(cfg, outcome)
    decision = _gate(cfg, version, gate_timeout_s) if promote else None
    publish_report("ldm-train-pipeline-report", f"{cfg.name}: v{version.version}",
                   [*rows, *metric_rows(outcome.metrics, TRAIN_METRICS), *_model_rows(version, decision)],
                   links=mlflow_links(outcome.run_id, version.name, version.version))
    return {**result, "run_id": outcome.run_id, "metrics": outcome.metrics, "model": _model(version, decision)}


def run_pipeline(**kwargs) -> dict:
    """Run the flow and return its result with the flow run's id and final state."""
    state = ldm_pipeline(return_state=True, **kwargs)
    summary = {"flow_run_id": str(state.state_details.flow_run_id), "state": state.type.value}
    if state.is_completed():
        summary.update(state.result())
    else:
        summary["message"] = state.message
    return summary


@flow(name="ldm-batch-generate", log_prints=True)
def batch_generate_flow(model: ModelUri, prompts: StorageUri, out: StorageUri, per_prompt: PositiveInt = 1,
                        seed: int = 0, batch_size: PositiveInt = 8, steps: PositiveInt | None = None,
                        guidance: float | None = None, sampler: str | None = None,
                        timeout_s: Seconds = 24 * HOUR) -> dict:
    """Images for every prompt of `prompts` from `model` (e.g. models:/NAME@champion) into `out`
    (a folder or s3:// prefix); index.json lists them once all exist. See training.mlops.batch_generate."""
    job = {"model": model, "prompts": prompts, "out": out, "per_prompt": per_prompt, "seed": seed,
           "batch_size": batch_size, "steps": steps, "guidance": guidance, "sampler": sampler}
    result = batch_generate_task.with_options(timeout_seconds=timeout_s)(job)
    print(f"{result['written']} images written, {result['skipped']} already there -> {result['index']}")
    publish_report("ldm-batch-generate-report", f"batch generation from {model}",
                   [("images written", result["written"]), ("already there", result["skipped"]),
                    ("index", result["index"])])
    return {k: v for k, v in result.items() if k != "names"}


# --- helpers ----------------------------------------------------------------------------------------


def _model(version: RegisteredVersion, decision: Decision | None) -> dict:
    model = {"name": version.name, "version": version.version, "uri": f"models:/{version.name}@{CANDIDATE}"}
    if decision is not None:
        model["gate"] = _gate_summary(decision)
    return model


def _storage_uri(uri: str | None) -> str | None:
    if uri is None:
        return None
    return check_output("result_storage", uri) if not storage.is_s3(uri) else uri


def _content_id(param: str, data: str) -> str:
    """The dataset's content id (reading its index): the identity its training is cached on."""
    from data_prep.dataset import read_dataset
    from data_prep.errors import DataPrepError
    from training.errors import ConfigError

    try:
        return read_dataset(data).content_id
    except DataPrepError as e:
        raise ConfigError(f"flow parameter `{param}`: {e}") from None


def _pinned(model: str) -> RegisteredVersion:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` as the version it names now."""
    from mlflow import MlflowClient

    from training.errors import ModelLoadError
    from training.locations import setup_mlflow
    from training.mlops.registry import RegistryError, resolve_version

    if not model.startswith("models:/"):
        raise ModelLoadError(f"flow parameter `model`: {model!r} is not a registered model (models:/NAME@ALIAS or "
                             f"models:/NAME/VERSION)")
    setup_mlflow()
    name, _, ref = model[len("models:/"):].replace("@", "/", 1).partition("/")
    if not name or not ref:
        raise ModelLoadError(f"flow parameter `model`: {model!r} names no version or alias (models:/NAME@ALIAS or "
                             f"models:/NAME/VERSION)")
    try:
        mv = resolve_version(MlflowClient(), name, ref)
    except RegistryError as e:
        raise ModelLoadError(f"flow parameter `model`: {e}") from None
    return RegisteredVersion(name=name, version=str(mv.version), run_id=mv.run_id or "")
