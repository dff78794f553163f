"""Prefect tasks: each calls one library function, so the same code runs with or without Prefect.

Every task gets resolved values (a RunConfig, absolute URIs), never a preset file to re-read: a worker
in another folder or on another machine might not find it. Retries follow policies.retry_transient;
timeouts are set per flow run from its parameters (`with_options`, see flows.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pipelines.prefect_setup  # noqa: F401  (PREFECT_HOME before Prefect is imported)

# isort: split
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.tasks import exponential_backoff

from pipelines.policies import identity_key, retry_transient
from training.config import RunConfig
from training.eval.gate import Decision, promote_if_better
from training.mlops.publish import PublishedVAE, TrainOutcome, publish, publish_vae
from training.mlops.registry import RegisteredVersion
from training.runtime.driver import train

STORAGE_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2),
                   "retry_jitter_factor": 0.5, "retry_condition_fn": retry_transient}
"""Tasks that only touch storage or MLflow: cheap to repeat, so three tries with back-off (2, 4, 8 s)."""


@task(cache_policy=NO_CACHE, **STORAGE_RETRIES)
def synth_task(out_dir: str, n: int, seed: int, image_size: int) -> str:
    from data_prep.synth import generate_synthetic

    generate_synthetic(out_dir, n, seed=seed, image_size=image_size)
    return out_dir


@dataclass(frozen=True)
class ShardSummary:
    """What the shard step made: the dataset and how the run went (the flow's `shards` result)."""

    output: str
    samples: int
    """Samples in the whole dataset."""
    written: int
    """Samples this run added."""
    shards: int
    skipped: dict[str, int]
    content_id: str
    existing: int = 0
    """Source items whose bytes the dataset already held (read and hashed, not written)."""
    part: str | None = None
    """The part this run added; None when there was nothing new."""


# Not cached: the shard step is idempotent by content already (a re-run over the same source reads and
# hashes every item and writes nothing), and any cheaper key (a listing, a prefix) would miss an image
# replaced in place under its old name.
@task(cache_policy=NO_CACHE, **STORAGE_RETRIES)
def shard_task(source: str, output: str, resolution: int, samples_per_shard: int | None,
               overwrite: bool) -> ShardSummary:
    from prefect.artifacts import create_markdown_artifact

    from data_prep.shard import ShardConfig, build_shards

    sizing = {} if samples_per_shard is None else {"samples_per_shard": samples_per_shard}
    report = build_shards(ShardConfig(source=source, output=output, resolution=resolution, overwrite=overwrite,
                                      progress=False, **sizing))
    get_run_logger().info("%d samples written (%d in the dataset), skipped %s", report.written,
                          report.dataset_samples, report.skipped)
    # A retried task re-runs the shard step, which then finds nothing new: the dataset is complete.
    create_markdown_artifact(report.markdown(), key="shard-report", description=f"ldmflow shard -> {output}")
    return ShardSummary(output=output, samples=report.dataset_samples, written=report.written, shards=report.shards,
                        skipped=dict(report.skipped), content_id=report.content_id, existing=report.existing,
                        part=report.part)


@task(cache_policy=NO_CACHE, **STORAGE_RETRIES)
def frozen_task(config: RunConfig) -> dict[str, str]:
    """sha256 of the config's frozen VAE and text encoder weights (loading them checks their paths): what
    the encode step's cache key names them by, so new weights under an old path encode again."""
    from training.tasks import frozen_hashes_for

    return frozen_hashes_for(config)


@dataclass(frozen=True)
class EncodeSummary:
    """What the encode step made: the latent dataset the LDM trains from (the flows' `latents` result)."""

    output: str
    """The latent dataset: <latents_dir>/<encoding id[:16]>."""
    samples: int
    shards: int
    encoded: int
    """Latent shards this run encoded (0 when they were all there)."""
    kept: int
    """Latent shards found complete from an earlier, interrupted or finished, encode."""
    skipped: dict[str, int]
    content_id: str
    """The latent dataset's content id: the identity training on it is cached on."""
    source_content_id: str
    """The raw dataset's."""
    encoding_id: str


def _encode_key(context, parameters: dict) -> str:
    """What an encode is: the raw dataset's content id, the frozen weights' hashes and the config fields
    that change the latents (training.encode.job.encoding_id), never the raw data's location. And where
    its result is kept: latents asked for in another `latents_dir` (another bucket, S3 instead of a
    local folder the Ray nodes cannot read) are written there, not answered with the old location."""
    from training.encode.job import encoding_id

    return identity_key(step="encode", latents=encoding_id(parameters["config"], parameters["content_id"],
                                                           parameters["frozen"]), kept_in=parameters["latents_dir"])


@task(cache_policy=CacheKeyFnPolicy(cache_key_fn=_encode_key), persist_result=True, retry_condition_fn=retry_transient,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5)
def encode_task(config: RunConfig, data: str, content_id: str, frozen: dict[str, str], latents_dir: str,
                workers: int | None = None, batch_size: int = 64) -> EncodeSummary:
    """`ldmflow encode` as a task: the raw dataset `data` (content id `content_id`) -> its latent dataset
    at <latents_dir>/<encoding id[:16]>, for `config`'s frozen encoders (`frozen`: their hashes, checked
    again against what encode_dataset loads). In this process with `workers` 0, else on Ray actors
    (RAY_ADDRESS's cluster, or the Ray of this process that the training jobs use). A retry, or a rerun
    after the cache was dropped, keeps every latent shard already written (encode_dataset resumes)."""
    import os

    from data_prep import storage
    from data_prep.dataset import read_dataset
    from pipelines.reports import publish_report
    from training.encode.job import encode_dataset, encoding_id
    from training.errors import DataError
    from training.loader.latents import latents_info

    identity = encoding_id(config, content_id, frozen)
    out = storage.join(latents_dir, identity[:16])
    workers = config.train.num_workers if workers is None else workers
    if workers and not (os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")):
        # No cluster: the Ray this process starts must be the one with the Jobs API (its dashboard) that
        # the training job is submitted to next; encode_dataset alone would start one without it.
        from training.runtime.jobs import jobs_address

        jobs_address(config)
    report = encode_dataset(config, data, out, workers=workers, batch_size=batch_size)
    info = latents_info(read_dataset(out))
    made_by = None if info is None else {"vae": info.vae.get("sha256"), "text_encoder": info.text_encoder.get("sha256")}
    if info is None or info.source_content_id != content_id or made_by != frozen:
        # The raw data or the model files changed between the flow's reading them and this encode.
        raise DataError(f"the latents at {out} are not those of dataset {content_id[:12]} with the encoders the flow "
                        "loaded: the raw data or the model files changed while the flow ran; run it again")
    get_run_logger().info("latents %s: %d samples in %d shards (%d encoded now, %d kept)", out, report.samples,
                          report.shards, report.encoded, report.kept)
    publish_report("encode-report", f"ldmflow encode {data} -> {out}", [
        ("raw dataset content id", content_id[:16]), ("samples", report.samples), ("latent shards", report.shards),
        ("encoded now", report.encoded), ("kept from an earlier run", report.kept),
        ("skipped", ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items()) if v) or "none"),
        ("seconds", report.seconds), ("VAE sha256", frozen.get("vae", "")[:16]),
        ("text encoder sha256", frozen.get("text_encoder", "")[:16])])
    return EncodeSummary(output=out, samples=report.samples, shards=report.shards, encoded=report.encoded,
                         kept=report.kept, skipped=dict(report.skipped), content_id=report.content_id,
                         source_content_id=content_id, encoding_id=identity)


def _training_key(context, parameters: dict) -> str:
    """What a training run is: the config's training hash (its pretrained inits, pinned model versions
    included), the task and the dataset's content id. Not the data's location."""
    config: RunConfig = parameters["config"]
    return identity_key(step="train", task=config.task, config_hash=config.hash, dataset=parameters["content_id"])


TRAINING_CACHE = CacheKeyFnPolicy(cache_key_fn=_training_key)


TRAIN_STEPS = ("vae", "ldm")
"""The training steps a flow run may have; each is one Ray job, keyed `<flow run id>-<step>`."""

JOB_STOP_GRACE_S = 120.0
"""Between Ray's SIGTERM and SIGKILL of a stopped training job: the driver ends its MLflow run and
releases the run's lease in it."""


def training_job_key(flow_run_id: str, step: str) -> str:
    """The Ray job's identity for a flow run's training step. It derives from the flow run alone, so a
    rerun of that flow run (after its worker died) re-attaches to the job, and the cancellation hook
    (which runs after the flow-run process is gone) finds it."""
    if step not in TRAIN_STEPS:
        raise ValueError(f"training step must be one of {TRAIN_STEPS}, got {step!r}")
    return f"{flow_run_id}-{step}"


def train_as_job(config: RunConfig, data: str, *, step: str, timeout_s: float | None,
                 forward_credentials: bool = False) -> TrainOutcome:
    """Training for a flow's task: a Ray job (training.runtime.jobs) on RAY_ADDRESS's cluster, or on a
    Ray this process starts when none is set, its log streamed into the task's log. The job outlives
    this worker; rerunning the flow run follows it again, and a failed or stopped job is resumed from its
    last verified checkpoint by the rerun. `timeout_s` stops the job itself (Prefect's timeout cannot
    interrupt this call).

    `forward_credentials` cannot travel in a job (its definition carries no secret), so then the driver
    runs in this task instead, as `ldmflow train --forward-credentials`, and lives only as long as it."""
    from prefect.runtime import flow_run

    from training.runtime.jobs import run_training_job

    log = get_run_logger()
    if forward_credentials:
        log.warning("forward_credentials: the training driver runs in this task, not as a Ray job (a job's "
                    "definition carries no credentials), so it does not outlive this worker")
        return train(config, data, forward_credentials=True)
    key = training_job_key(flow_run.get_id(), step)
    return run_training_job(config, data, key=key, timeout_s=timeout_s, log=log, stop_grace_s=JOB_STOP_GRACE_S,
                            on_submit=lambda sid: log.info("following Ray job %s", sid))


def task_timeout(timeout_s: float) -> float:
    """Prefect's timeout of a training task: a backstop past the job's own `timeout_s` and the stop
    that follows it, so the job is stopped (and the task fails with its message) first."""
    return timeout_s + JOB_STOP_GRACE_S + 120


@task(cache_policy=TRAINING_CACHE, persist_result=True, retry_condition_fn=retry_transient,
      retry_delay_seconds=exponential_backoff(backoff_factor=30), retry_jitter_factor=0.5)
def train_task(config: RunConfig, data: str, content_id: str, forward_credentials: bool = False,
               timeout_s: float | None = None) -> TrainOutcome:
    """`config` is the resolved run config; `content_id` the dataset's, the cache's identity of `data`
    (checked against the dataset when training starts: the run's tags record what it read).
    Trains as a Ray job (train_as_job); `forward_credentials` as `ldmflow train --forward-credentials`
    (read from the task's own environment; never a flow parameter's value)."""
    return train_as_job(config, data, step="ldm", timeout_s=timeout_s, forward_credentials=forward_credentials)


@task(cache_policy=TRAINING_CACHE, persist_result=True, retry_condition_fn=retry_transient,
      retry_delay_seconds=exponential_backoff(backoff_factor=30), retry_jitter_factor=0.5)
def train_vae_task(config: RunConfig, data: str, content_id: str, forward_credentials: bool = False,
                   timeout_s: float | None = None) -> PublishedVAE:
    """`ldmflow train-vae` as a task: trains (as a Ray job), exports and logs the VAE; returns its folder and scores."""
    outcome = train_as_job(config, data, step="vae", timeout_s=timeout_s, forward_credentials=forward_credentials)
    published = publish_vae(outcome, config)
    get_run_logger().info("VAE %s: scaling factor %.4f, held-out PSNR %s dB", published.path,
                          published.scaling_factor, "-" if published.psnr is None else f"{published.psnr:.2f}")
    return published


def stop_training_jobs(flow, flow_run, state) -> None:
    """A flow's on_cancellation hook: stop the flow run's training jobs. It runs in the worker after the
    flow-run process is gone, so it finds them by the flow run's id alone. Without RAY_ADDRESS the jobs
    ran on a Ray of the flow-run process, which ended with it."""
    import logging
    import os

    from training.runtime.jobs import stop_training_job

    log = logging.getLogger("ldmflow.flows")
    if not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        log.info("flow run %s cancelled: its training ran on the flow run's own Ray, gone with it", flow_run.id)
        return
    for step in TRAIN_STEPS:
        stopped = stop_training_job(training_job_key(str(flow_run.id), step), wait_s=JOB_STOP_GRACE_S + 30)
        if stopped:
            log.info("flow run %s cancelled: stopped Ray job %s", flow_run.id, stopped)


# Not cached: registration is idempotent in the registry itself (one version per run and model name,
# registry.register_pipeline), which also survives a version deleted since.
@task(cache_policy=NO_CACHE, **STORAGE_RETRIES)
def publish_task(config: RunConfig, outcome: TrainOutcome) -> RegisteredVersion:
    return publish(outcome, config)


@dataclass(frozen=True)
class Champion:
    version: str
    dataset_content_id: str | None
    """The dataset the champion was trained on (its version's tag)."""
    source_content_id: str | None = None
    """The raw dataset its data was encoded from when it trained on latents (its run's tag)."""

    def trained_on(self, content_id: str) -> bool:
        """Whether the champion trained on the raw dataset `content_id`, as pixels or as its latents."""
        return content_id in (self.dataset_content_id, self.source_content_id)


@task(cache_policy=NO_CACHE, **STORAGE_RETRIES)
def champion_task(name: str) -> Champion | None:
    """The current `champion` of registered model `name`, None when there is none (or no such model)."""
    from mlflow import MlflowClient

    from training.locations import setup_mlflow
    from training.mlops.registry import current_champion, filter_literal

    setup_mlflow()
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = {filter_literal(name)}"):
        return None
    version = current_champion(client, name)
    if version is None:
        return None
    source = None
    if version.run_id:
        source = client.get_run(version.run_id).data.tags.get("source_content_id")
    return Champion(str(version.version), version.tags.get("dataset_content_id"), source)


def _evaluation_key(context, parameters: dict) -> str:
    # A pinned version (models:/NAME/VERSION) and the settings: an alias would move under the key.
    return identity_key(step="evaluate", **parameters)


@task(cache_policy=CacheKeyFnPolicy(cache_key_fn=_evaluation_key), persist_result=True, **STORAGE_RETRIES)
def evaluate_task(model_uri: str, prompts: int, per_prompt: int, steps: int | None, seed: int) -> dict:
    """Caption adherence of `model_uri` (a pinned version), recorded on its run and version; the metrics."""
    from training.eval.evaluate import run_evaluation

    evaluation = run_evaluation(model_uri, prompts=prompts, per_prompt=per_prompt, steps=steps, seed=seed)
    return {"metrics": dict(evaluation.metrics), "eval_set_id": evaluation.eval_set_id,
            "grid": str(evaluation.grid_path) if evaluation.grid_path else None}


@task(cache_policy=NO_CACHE, **STORAGE_RETRIES)
def gate_task(config: RunConfig, version: RegisteredVersion) -> Decision:
    """The promotion gate on the new version (config.gate): champion only if it beats the current one.
    A retry is safe: a version already champion is left as it is."""
    decision = promote_if_better(version.name, version.version, config.gate)
    get_run_logger().info("%s v%s: %s (%s)", version.name, version.version,
                          "now champion" if decision.promoted else "not promoted", decision.reason)
    return decision


@task(cache_policy=NO_CACHE, **STORAGE_RETRIES)
def batch_generate_task(job: dict) -> dict:
    # A retry is cheap: run_batch skips the images an earlier try already published.
    from training.mlops.batch_generate import BatchJob, run_batch

    return asdict(run_batch(BatchJob(**job)))
