"""`ldmflow train --resume RUN_ID` after the driver died: the same MLflow run continues from its latest
verified checkpoint, and ends bit-identical to a run that was never interrupted.

Both runs go through the CLI in their own processes, as a user (or a flow worker) would start them.
The interrupted one is killed with SIGKILL together with every process it started (its local Ray:
GCS, raylet, workers), which is what losing the head node or the machine looks like."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from tests.training.run_logs import find_run, last_trained_step

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[3]
STEPS = 18
CHECKPOINT_EVERY = 6
KILL_AFTER_STEP = 8
"""The kill waits for a verified checkpoint and for the workers to have trained past this step."""
OVERRIDES = [
    f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
    "train.lr_schedule=cosine", "train.warmup_steps=4", "train.ema.enabled=true", "train.loader_workers=1",
    "train.checkpoints_to_keep=3",
]


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, **kwargs)


def train_args(data: Path, run_name: str) -> list[str]:
    sets = [a for o in [*OVERRIDES, f"tracking.run_name={run_name}"] for a in ("--set", o)]
    return ["train", "--data", str(data), "--no-register", *sets]


def verified_steps(run_storage: Path) -> set[int]:
    from training.checkpoint.layout import CheckpointError
    from training.checkpoint.verify import read_state

    steps = set()
    for marker in run_storage.glob("checkpoint_*/COMMITTED"):
        try:
            steps.add(read_state(marker.parent).step)
        except (CheckpointError, OSError, ValueError, KeyError):
            pass
    return steps


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started, all at once: no process gets to clean up."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def final_weights(checkpoint: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from training.checkpoint.verify import read_state

    read_state(checkpoint, verify_hashes=True)
    return load_file(f"{checkpoint}/unet.safetensors"), load_file(f"{checkpoint}/ema.safetensors")


def test_resume_after_driver_kill_matches_an_uninterrupted_run(tmp_path):
    from mlflow import MlflowClient

    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from training.locations import runs_dir, tracking_uri

    generate_synthetic(tmp_path / "raw", 48, seed=4)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), samples_per_shard=7,
                             progress=False))
    data = tmp_path / "shards"
    client = MlflowClient(tracking_uri())
    env = {**os.environ, "LDMFLOW_SAMPLE_LOG": str(tmp_path / "samples-killed")}

    # 1. Interrupted: killed once a checkpoint is verified and the workers trained past it.
    name = f"resume-{uuid.uuid4().hex[:10]}"
    proc = cli(*train_args(data, name), env=env)
    deadline, run, killed_at, verified = time.monotonic() + 600, None, None, set()
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            run = run or find_run(client, name)
            if run is not None:
                verified = verified_steps(runs_dir() / "ray" / f"train-{run.info.run_id}")
                killed_at = last_trained_step(tmp_path / "samples-killed")
                if verified and killed_at > max(verified) + 1 and killed_at >= KILL_AFTER_STEP:
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own (rc {proc.returncode}) before the kill"
    assert max(verified) < STEPS, verified
    run_id = run.info.run_id

    # 2. Resumed by run id: same run, no data/config given.
    resumed = cli("train", "--resume", run_id, "--no-register",
                  env={**os.environ, "LDMFLOW_SAMPLE_LOG": str(tmp_path / "samples-resumed")})
    assert resumed.wait(timeout=900) == 0
    resumed_from = client.get_metric_history(run_id, "resumed_from_step")
    assert [m.step for m in resumed_from] == [m.value for m in resumed_from], resumed_from
    (start,) = [int(m.step) for m in resumed_from]
    assert start in verified and start >= max(verified) - CHECKPOINT_EVERY, (start, verified)
    print(f"driver kill: workers had started step {killed_at}, resumed from step {start}: "
          f"{killed_at - start} steps lost")

    # 3. Uninterrupted, same config.
    straight_name = f"straight-{uuid.uuid4().hex[:10]}"
    straight = cli(*train_args(data, straight_name))
    assert straight.wait(timeout=900) == 0
    straight_run = find_run(client, straight_name)

    # Every step logged exactly once, and the losses are the uninterrupted run's, bit for bit.
    history = client.get_metric_history(run_id, "loss")
    assert Counter(m.step for m in history) == Counter(range(1, STEPS + 1))
    reference = {m.step: m.value for m in client.get_metric_history(straight_run.info.run_id, "loss")}
    assert {m.step: m.value for m in history} == reference

    run = client.get_run(run_id)
    assert run.data.tags["resumes"] == "1" and run.data.tags["resume.1.from_step"] == str(start)
    unet, ema = final_weights(run.data.tags["checkpoint"])
    unet_ref, ema_ref = final_weights(client.get_run(straight_run.info.run_id).data.tags["checkpoint"])
    assert unet.keys() == unet_ref.keys() and ema.keys() == ema_ref.keys()
    assert all(torch.equal(unet[k], unet_ref[k]) for k in unet)
    assert all(torch.equal(ema[k], ema_ref[k]) for k in ema)
