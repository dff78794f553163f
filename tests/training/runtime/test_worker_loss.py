"""A worker killed mid-run: Ray restarts the group from the latest committed checkpoint and the run
finishes with every step logged exactly once (a restart from scratch would repeat steps). It runs
with gradient accumulation and EMA on, so both go through the restart.

The test finds everything it needs in what its own run exposes: the MLflow run (found by its unique
name) tags each rank's process (`worker.rank<N>`), checkpoints land under the run's own Ray storage
folder (`runs/ray/train-<run id>/`), and a restore logs `resumed_from_step`."""

from __future__ import annotations

import os
import signal
import socket
import threading
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
CHECKPOINT_EVERY = 4
STEPS = 40
"""Long enough (about 10 s on 2 CPU cores after the first checkpoint) that the kill, which waits
REGISTRATION_GRACE_S after one, lands well before the last step; the test fails if it does not."""
REGISTRATION_GRACE_S = 5.0
"""Ray's controller registers a checkpoint when it next polls the workers (every 2 s by default), after
every rank has uploaded its part: the kill waits this long after the checkpoint is complete."""


def complete_checkpoint_steps(run_storage: Path) -> set[int]:
    """Steps of the run's checkpoints that are COMMITTED and whose listed files are all in place."""
    from training.checkpoint.layout import COMMITTED, CheckpointError
    from training.checkpoint.verify import read_state

    steps = set()
    for marker in run_storage.glob(f"checkpoint_*/{COMMITTED}"):
        try:
            steps.add(read_state(marker.parent, verify_hashes=True).step)
        except (CheckpointError, OSError, ValueError, KeyError):
            pass  # still uploading, or deleted by Ray's retention meanwhile
    return steps


def own_worker(pid: int) -> psutil.Process:
    """The process only if it is a Ray Train worker of the Ray this test process started."""
    proc = psutil.Process(pid)
    assert proc.pid in {p.pid for p in psutil.Process().children(recursive=True)}, \
        f"pid {pid} is not a descendant of this test process"
    assert "RayTrainWorker" in " ".join(proc.cmdline()), proc.cmdline()
    return proc


def kill_rank_1_after_a_checkpoint(experiment: str, run_name: str, done: threading.Event, kill: dict,
                                   sample_log: Path) -> None:
    from mlflow import MlflowClient

    from training.locations import runs_dir, tracking_uri

    client = MlflowClient(tracking_uri())
    deadline = time.monotonic() + 600
    run_id = None
    try:
        while not done.is_set() and time.monotonic() < deadline:
            run = find_run(client, run_name, experiment)
            run_id = run_id or (run.info.run_id if run else None)
            storage = runs_dir() / "ray" / f"train-{run_id}"
            if run_id and complete_checkpoint_steps(storage) - {STEPS}:
                break
            time.sleep(0.1)
        else:
            return
        if done.wait(REGISTRATION_GRACE_S):
            return
        host, pid = client.get_run(run_id).data.tags["worker.rank1"].split()
        assert host == socket.gethostname(), host
        proc = own_worker(int(pid))
        kill["committed"] = complete_checkpoint_steps(storage)
        kill["trained"] = last_trained_step(sample_log)
        if STEPS in kill["committed"] or done.is_set():
            return  # too late: the run is finishing; the test fails on `kill` having no pid
        os.kill(proc.pid, signal.SIGKILL)
        kill["pid"] = proc.pid
        # A checkpoint whose upload finished between the look above and the kill is as good a restore
        # point: rank 1's part was written before it died. Look again once the killed group has stopped
        # (no checkpoint completes without rank 1 afterwards).
        time.sleep(2.0)
        kill["committed_after"] = complete_checkpoint_steps(storage)
        print(f"killed rank 1 (pid {proc.pid}) with checkpoints at steps {sorted(kill['committed'])} "
              f"(after the kill: {sorted(kill['committed_after'])})")
    except Exception as e:  # reported by the test, not lost in the thread
        kill["error"] = repr(e)


def test_training_survives_a_killed_worker(tmp_path, monkeypatch):
    import ray
    from mlflow import MlflowClient

    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from training.checkpoint.verify import read_state
    from training.config import load_config
    from training.runtime.driver import train

    run_name = f"worker-loss-{uuid.uuid4().hex[:12]}"
    generate_synthetic(tmp_path / "raw", 32, seed=1)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), samples_per_shard=8))
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
        "train.max_failures=1", "train.grad_accum=2", "train.ema.enabled=true", "train.loader_workers=1",
        f"tracking.run_name={run_name}",
    ])
    monkeypatch.setenv("LDMFLOW_SAMPLE_LOG", str(tmp_path / "samples"))
    done, kill = threading.Event(), {}
    watcher = threading.Thread(target=kill_rank_1_after_a_checkpoint,
                               args=(cfg.tracking.experiment, run_name, done, kill, tmp_path / "samples"),
                               daemon=True)
    watcher.start()
    try:
        outcome = train(cfg, str(tmp_path / "shards"))
    finally:
        done.set()
        watcher.join(timeout=30)
        ray.shutdown()
    assert "error" not in kill, kill["error"]
    assert "pid" in kill, f"the test never killed rank 1 before the last step: {kill}"
    # The restart shows in the run: restored from a checkpoint committed when rank 1 died, not the last.
    resumed = MlflowClient().get_metric_history(outcome.run_id, "resumed_from_step")
    assert len(resumed) == 1, resumed
    assert resumed[0].value == resumed[0].step, resumed
    restorable = kill["committed"] | kill["committed_after"]
    assert resumed[0].step in restorable and resumed[0].step < STEPS, (resumed, kill)
    assert resumed[0].step >= max(kill["committed"]), (resumed, kill)

    state = read_state(outcome.checkpoint_dir)
    assert state.step == STEPS
    assert state.samples_seen == STEPS * cfg.train.batch_size * cfg.train.grad_accum * 2
    history = MlflowClient().get_metric_history(outcome.run_id, "loss")
    # Every step logged exactly once: steps redone after the restart are not logged again.
    assert Counter(m.step for m in history) == Counter(range(1, STEPS + 1))
    print(f"worker kill: ranks had started step {kill['trained']}, resumed from step {int(resumed[0].step)}: "
          f"{kill['trained'] - int(resumed[0].step)} steps lost")

    # The export takes the EMA weights, restored through the restart with the rest.
    from training.mlops.export import build_pipeline, load_trained_unet
    from training.models.assembly import build_components

    unet = build_components(cfg.model, seed=cfg.train.seed).unet
    assert load_trained_unet(Path(outcome.checkpoint_dir), cfg, unet, use_ema=True) == "ema"
    pipe, _ = build_pipeline(Path(outcome.checkpoint_dir))
    init = build_components(cfg.model, seed=cfg.train.seed).unet.state_dict()
    trained = pipe.unet.state_dict()
    assert trained.keys() == init.keys()
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert any(not torch.equal(trained[k], init[k]) for k in init)
