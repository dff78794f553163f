"""The checkpoint group: how long a checkpoint step stalls training, sync vs async upload, against a normal step.

    storage         SeaweedFS on 127.0.0.1 (tests/s3_server.py), one bucket; Ray Train's storage is
                    s3://<bucket>/ray-<mode>, so every checkpoint goes through Ray's pyarrow S3 upload
    data            a few generated 64px samples, sharded locally (the data path is not what is measured)
    runs            the tiny preset, 2 Ray workers, ZeRO-2, EMA on, train.log_every=1, a checkpoint every
                    `every` steps; train.checkpoint_upload=sync and =async in the same process, and with
                    repeats the next pair starts with the other mode, so a burst of load lands on both
    numbers         read back from MLflow (an isolated SQLite store): `step_seconds` of every step (the
                    slowest rank's), `checkpoint_seconds` (rank 0's save_and_report: DeepSpeed save and
                    ray.train.report; with sync upload also hashing and upload) of every checkpoint
                    step, and when rank 0 logged each step

Per mode, over all its runs (the final checkpoint is always left out: it also gathers the full UNet and
waits for every upload to finish):
    normal step       median step_seconds of the steps after the first WARMUP_STEPS that are neither a
                      checkpoint step nor the step right after one
    checkpoint step   median of step_seconds + checkpoint_seconds over the checkpoint steps: the stall,
                      from the start of a checkpoint step until rank 0 (which saves the most: EMA and model
                      states) can start the next one
    step after        median step_seconds of the step right after a checkpoint. It is the slowest rank's
                      time, and a rank that finished its checkpoint first counts its wait for rank 0 in it;
                      rank 0's own time for that step (from the end of its save_and_report to the end of the
                      step, metrics flush included) is reported beside it, against rank 0's normal step
    checkpoint cost   rank 0's wall clock from the end of one checkpoint step to the end of the next one
                      (a checkpoint and `every` steps; the first checkpoint left out as warm-up), less
                      `every` of rank 0's normal steps: what a checkpoint costs in all, wherever its time
                      lands. Where the upload competes with training for the same cores (CPU training on
                      a small machine), async upload moves time into the following steps

A stall's ratio to a normal step reads "x a normal step": 1 would be a free checkpoint. Each mode is
compared with the normal steps of its own runs, so a slower stretch of the shared machine during one
mode's run does not bias it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODES = ("sync", "async")
WARMUP_STEPS = 3
"""Steps at the start of a run left out of the normal-step median (first-call allocations, caches)."""
_AWS_UNSET = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
              "AWS_SECURITY_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_REGION", "MLFLOW_TRACKING_URI")
"""Variables that would point boto3, pyarrow or MLflow somewhere other than this benchmark's servers."""


@dataclass
class StallRun:
    """One training run: per-step timings as MLflow has them, and the checkpoint sizes in storage."""

    mode: str
    run_id: str
    wall_s: float
    """train() from call to return: Ray Train start, model build, all steps, final gather and upload."""
    step_seconds: dict[int, float]
    checkpoint_seconds: dict[int, float]
    logged_at: dict[int, float]
    """When rank 0 logged each step's metrics (s since the epoch, ms resolution): after the step, before its
    checkpoint."""
    checkpoint_bytes: int
    """Bytes in storage of the last non-final checkpoint (every rank's files)."""
    final_checkpoint_bytes: int
    """Bytes of the final checkpoint, which also holds the gathered UNet (unet.safetensors)."""


@dataclass
class ModeSummary:
    normal_s: float
    checkpoint_step_s: float
    """step_seconds + checkpoint_seconds at a checkpoint step: the whole stall."""
    save_and_report_s: float
    """checkpoint_seconds alone: DeepSpeed save, ray.train.report (sync: hashing and upload too)."""
    after_s: float
    """step_seconds of the step after a checkpoint (the slowest rank's, waits for rank 0 included)."""
    normal_rank0_s: float
    """Rank 0's wall clock from one step's log to the next, over the normal steps."""
    after_rank0_s: float
    """Rank 0's wall clock from the end of its save_and_report to the log of the next step."""
    interval_s: float
    """Mean of rank 0's wall clock from a checkpoint step's log to the log `every` steps later."""
    every: int
    normal_count: int
    checkpoint_count: int
    interval_count: int

    @property
    def stall_ratio(self) -> float:
        return self.checkpoint_step_s / self.normal_s

    @property
    def after_ratio(self) -> float:
        return self.after_s / self.normal_s

    @property
    def after_rank0_ratio(self) -> float:
        return self.after_rank0_s / self.normal_rank0_s

    @property
    def checkpoint_cost_s(self) -> float:
        """A checkpoint's whole cost: its interval less `every` normal steps."""
        return self.interval_s - self.every * self.normal_rank0_s

    @property
    def checkpoint_cost_steps(self) -> float:
        return self.checkpoint_cost_s / self.normal_rank0_s

    def to_dict(self) -> dict:
        return asdict(self) | {name: getattr(self, name) for name in (
            "stall_ratio", "after_ratio", "after_rank0_ratio", "checkpoint_cost_s", "checkpoint_cost_steps")}


@dataclass
class StallResult:
    steps: int
    every: int
    samples: int
    repeats: int
    runs: list[StallRun] = field(default_factory=list)
    unavailable: str | None = None
    """Why nothing was measured (no SeaweedFS binary), else None."""
    s3_startup_s: float = 0.0

    def checkpoint_steps(self) -> list[int]:
        """Checkpoint steps that count: every `every`-th, not the final step."""
        return list(range(self.every, self.steps, self.every))

    def interval_starts(self) -> list[int]:
        """Checkpoint steps that start a counted interval: all but the first (warm-up)."""
        return self.checkpoint_steps()[1:]

    def normal_steps(self) -> list[int]:
        checkpoints = set(self.checkpoint_steps()) | {self.steps}
        return [s for s in range(WARMUP_STEPS + 1, self.steps)
                if s not in checkpoints and s - 1 not in checkpoints]

    def summary(self, mode: str) -> ModeSummary:
        runs = [r for r in self.runs if r.mode == mode]
        ckpt, normal = self.checkpoint_steps(), self.normal_steps()
        normal_times = [r.step_seconds[s] for r in runs for s in normal]
        stalls = [r.step_seconds[s] + r.checkpoint_seconds[s] for r in runs for s in ckpt]
        intervals = [r.logged_at[s + self.every] - r.logged_at[s] for r in runs for s in self.interval_starts()]
        return ModeSummary(
            normal_s=statistics.median(normal_times),
            checkpoint_step_s=statistics.median(stalls),
            save_and_report_s=statistics.median(r.checkpoint_seconds[s] for r in runs for s in ckpt),
            after_s=statistics.median(r.step_seconds[s + 1] for r in runs for s in ckpt),
            normal_rank0_s=statistics.median(r.logged_at[s] - r.logged_at[s - 1] for r in runs for s in normal),
            after_rank0_s=statistics.median(r.logged_at[s + 1] - r.logged_at[s] - r.checkpoint_seconds[s]
                                            for r in runs for s in ckpt),
            interval_s=statistics.fmean(intervals), every=self.every, normal_count=len(normal_times),
            checkpoint_count=len(stalls), interval_count=len(intervals),
        )

    def checkpoint_bytes(self) -> int:
        return max(r.checkpoint_bytes for r in self.runs)

    def final_checkpoint_bytes(self) -> int:
        return max(r.final_checkpoint_bytes for r in self.runs)


def measure(work: Path, *, steps: int = 30, every: int = 5, repeats: int = 1, samples: int = 64) -> StallResult:
    """Train `repeats` x (sync, async) runs against a local SeaweedFS and collect their timings."""
    import ray

    from tests.s3_server import S3Server, weed_binary

    if every < 3 or steps < 3 * every:
        raise ValueError(f"the checkpoint group needs --checkpoint-every >= 3 (normal steps between checkpoints) "
                         f"and --checkpoint-steps >= 3 x every (a warm-up checkpoint, a counted one, the final one); "
                         f"got steps={steps}, every={every}")
    result = StallResult(steps=steps, every=every, samples=samples, repeats=repeats)
    try:
        weed_binary()
    except RuntimeError as e:
        result.unavailable = str(e)
        return result

    shards = _make_shards(work / "checkpoint-data", samples)
    # Ray's workers inherit the environment Ray starts with: the S3 credentials must be in it, so a Ray
    # started earlier in this process (the deepspeed group) is stopped first.
    ray.shutdown()
    server = S3Server()
    try:
        server.start()
        result.s3_startup_s = server.startup_seconds
        bucket = server.make_bucket()
        with _environment(server, runs=work / "checkpoint-runs"):
            for i in range(repeats):
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    result.runs.append(_train_once(mode, shards, f"s3://{bucket}/ray-{mode}", steps, every))
    finally:
        ray.shutdown()
        server.stop()
    return result


def _make_shards(root: Path, samples: int) -> str:
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    generate_synthetic(root / "raw", samples, seed=0, image_size=64)
    build_shards(ShardConfig(source=str(root / "raw"), output=str(root / "shards"), resolution=64,
                             samples_per_shard=16, overwrite=True, progress=False))
    return str(root / "shards")


@contextmanager
def _environment(server, *, runs: Path) -> Iterator[None]:
    """The AWS environment pointing at `server` (and nowhere else: no profile, no ~/.aws, no instance
    metadata) and an MLflow store of our own under `runs`; the previous environment is put back after."""
    from data_prep import storage

    changes: dict[str, str | None] = {key: None for key in _AWS_UNSET}
    changes.update(server.env())
    changes.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_EC2_METADATA_DISABLED="true", LDMFLOW_RUNS_DIR=str(runs))
    saved = {key: os.environ.get(key) for key in changes}
    try:
        _apply(changes)
        storage.reset_clients()
        yield
    finally:
        _apply(saved)
        storage.reset_clients()


def _apply(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _train_once(mode: str, shards: str, storage_uri: str, steps: int, every: int) -> StallRun:
    import mlflow

    from training.config import load_config
    from training.checkpoint.run_storage import run_uri
    from training.checkpoint.verify import list_checkpoints
    from training.runtime.driver import ray_run_name, train
    from training.locations import setup_mlflow

    cfg = load_config("tiny", [
        f"train.max_steps={steps}", "train.log_every=1", f"train.checkpoint_every={every}",
        f"train.checkpoint_upload={mode}", "tracking.experiment=bench-checkpoint",
        f"tracking.run_name=bench-checkpoint-{mode}",
    ])
    began = time.perf_counter()
    outcome = train(cfg, shards, storage_uri=storage_uri)
    wall = time.perf_counter() - began

    setup_mlflow()
    client = mlflow.MlflowClient()

    steps_logged = client.get_metric_history(outcome.run_id, "step_seconds")
    checkpoints_logged = client.get_metric_history(outcome.run_id, "checkpoint_seconds")

    refs = list_checkpoints(run_uri(storage_uri, ray_run_name(outcome.run_id)))
    sizes = {ref.step: sum(ref.files.values()) for ref in refs if ref.step is not None}
    final = sizes.pop(steps, 0)
    return StallRun(mode=mode, run_id=outcome.run_id, wall_s=wall,
                    step_seconds={m.step: m.value for m in steps_logged},
                    checkpoint_seconds={m.step: m.value for m in checkpoints_logged},
                    logged_at={m.step: m.timestamp / 1000 for m in steps_logged},
                    checkpoint_bytes=sizes[max(sizes)] if sizes else 0, final_checkpoint_bytes=final)
