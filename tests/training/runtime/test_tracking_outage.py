"""Training against a real MLflow server that goes down for longer than a checkpoint interval and
comes back: training does not slow down, finishes, and every step's metrics are in the run at the
end. The tracking URI carries a planted secret (`user:token@`), which must appear nowhere: not in
the run's params or tags, the driver's or workers' output, or what Ray persists.

One training run (`ldmflow train`, in its own process as a user starts it) serves both tests."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer
from tests.training.run_logs import find_run, last_trained_step

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[3]
SECRET = "s3cr3t-PLANTED"
STEPS = 60
CHECKPOINT_EVERY = 10
STOP_AT_STEP = 12
"""The server goes down once the workers trained past this step ..."""
DOWN_FOR_STEPS = CHECKPOINT_EVERY + 5
"""... and comes back this many steps later: longer than a checkpoint interval, a checkpoint included."""


class Outage:
    """What the fixture's one run left: the server, run id, the outage's steps, and the output."""

    server: MlflowServer
    run_id: str
    down_steps: range
    output: str
    ray_tmp: Path
    storage: Path
    wall_s: float


@pytest.fixture(scope="module")
def outage(tmp_path_factory) -> Outage:
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from training.locations import runs_dir

    tmp = tmp_path_factory.mktemp("outage")
    generate_synthetic(tmp / "raw", 48, seed=5)
    build_shards(ShardConfig(source=str(tmp / "raw"), output=str(tmp / "shards"), samples_per_shard=8,
                             progress=False))
    server = MlflowServer(tmp / "mlflow").start()
    secret_uri = server.uri.replace("http://", f"http://ldm-user:{SECRET}@")
    # A short path: Ray puts unix sockets under it (108-byte limit).
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        name = f"outage-{uuid.uuid4().hex[:10]}"
        sets = [f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
                "train.num_workers=2", "train.loader_workers=1", "validation.holdout_fraction=0.1",
                "tracking.sample_steps=2", f"tracking.run_name={name}"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": secret_uri, "RAY_TMPDIR": str(ray_tmp),
               "LDMFLOW_SAMPLE_LOG": str(tmp / "samples")}
        log_file = tmp / "driver.log"
        started = time.monotonic()
        with open(log_file, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--data", str(tmp / "shards"),
                                     "--no-register", *[a for s in sets for a in ("--set", s)]],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Down once the workers are past STOP_AT_STEP; back DOWN_FOR_STEPS steps later, by the workers'
            # own sample log (MLflow, the usual witness, is what is down).
            deadline = time.monotonic() + 600
            while last_trained_step(tmp / "samples") <= STOP_AT_STEP and proc.poll() is None:
                assert time.monotonic() < deadline, "training never reached the outage"
                time.sleep(0.1)
            server.kill()
            stopped_at = last_trained_step(tmp / "samples")
            while last_trained_step(tmp / "samples") < stopped_at + DOWN_FOR_STEPS and proc.poll() is None:
                assert time.monotonic() < deadline, "training stalled during the outage"
                time.sleep(0.1)
            back_at = last_trained_step(tmp / "samples")
            server.restart()
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = log_file.read_text(errors="replace")
        assert rc == 0, output[-5000:]
        assert back_at - stopped_at >= CHECKPOINT_EVERY, (stopped_at, back_at, "the run ended during the outage")

        from mlflow import MlflowClient

        result = Outage()
        result.server, result.output, result.ray_tmp = server, output, ray_tmp
        result.wall_s = time.monotonic() - started
        result.run_id = find_run(MlflowClient(server.uri), name).info.run_id
        # Steps the workers started while the server was down (the ends may straddle the stop/start).
        result.down_steps = range(stopped_at + 1, back_at)
        result.storage = runs_dir() / "ray" / f"train-{result.run_id}"
        yield result
    finally:  # a failed run too: no server or Ray folder outlives the test
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_training_survives_a_tracking_outage(outage):
    from mlflow import MlflowClient

    client = MlflowClient(outage.server.uri)
    run = client.get_run(outage.run_id)
    assert run.info.status == "FINISHED"

    # Every step's metrics, each exactly once.
    for key in ("loss", "lr", "grad_norm", "samples_per_sec", "step_seconds", "memory_rss_mb"):
        steps = Counter(m.step for m in client.get_metric_history(outage.run_id, key))
        assert steps == Counter(range(1, STEPS + 1)), (key, sorted(set(range(1, STEPS + 1)) - set(steps)))
    assert "tracking.dropped_metrics" not in run.data.tags  # the buffer held the whole outage
    assert [m.step for m in client.get_metric_history(outage.run_id, "checkpoint_seconds")] == \
        list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
    # The final validation's sample grid went through the same background delivery.
    assert f"samples/step-{STEPS:06d}.png" in [f.path for f in client.list_artifacts(outage.run_id, "samples")]
    # System metrics (the driver's machine) and the dataset input.
    assert any(k.startswith("system/") for k in run.data.metrics)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == run.data.tags["dataset_content_id"][:36]
    assert '"samples": 48' in dataset_input.dataset.profile

    # Training did not wait on the server: the run's own step time (the slowest rank's, so a rank 0
    # stuck in a flush would show in the others' waits at the next collective), during vs outside.
    step_s = {m.step: m.value for m in client.get_metric_history(outage.run_id, "step_seconds")}
    during = [step_s[s] for s in outage.down_steps]
    normal = [v for s, v in step_s.items() if s > 3 and s not in outage.down_steps]
    ratio = statistics.median(during) / statistics.median(normal)
    # And the wall time between steps' logs (which a stalled log call would stretch), checkpoint
    # and validation steps aside.
    stamps = {m.step: m.timestamp for m in client.get_metric_history(outage.run_id, "loss")}
    gaps = {s: (stamps[s] - stamps[s - 1]) / 1000 for s in range(5, STEPS + 1) if (s - 1) % CHECKPOINT_EVERY}
    wall_ratio = statistics.median([g for s, g in gaps.items() if s in outage.down_steps]) / \
        statistics.median([g for s, g in gaps.items() if s not in outage.down_steps])
    print(f"\ntracking outage: steps {outage.down_steps.start}-{outage.down_steps.stop - 1} trained with the server "
          f"down; step time during / normal = {statistics.median(during):.3f} s / {statistics.median(normal):.3f} s "
          f"= {ratio:.3f}; wall time between steps during / normal = {wall_ratio:.3f}; "
          f"whole run {outage.wall_s:.0f} s")
    # Not slower by more than 10% (faster is possible: no HTTP traffic competes for the 2 cores).
    assert ratio <= 1.10, ratio
    assert wall_ratio <= 1.10, wall_ratio


def test_planted_secret_appears_nowhere(outage):
    from mlflow import MlflowClient

    run = MlflowClient(outage.server.uri).get_run(outage.run_id)
    assert run.data.params and run.data.tags
    for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
        leaks = [k for k, v in values.items() if SECRET in k or SECRET in v]
        assert not leaks, f"the planted secret is in the run's {kind}s {leaks}"
    # The output of the driver and (through Ray's log forwarding) of the workers: really there.
    assert "step 60/60" in outage.output
    assert SECRET not in outage.output
    # What Ray and MLflow keep on disk: Ray's session (job table, logs, worker output), the run's
    # storage (Ray Train's persisted state and checkpoints), the server's store and artifacts.
    searched = 0
    for root in (outage.ray_tmp, outage.storage, outage.server.folder):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                searched += 1
                assert SECRET.encode() not in data, f"the planted secret is in {path}"
    assert searched > 20
