"""Training as a Ray Job (training.runtime.jobs) against a real Ray head on 127.0.0.1, started by the
fixture with its own temp dir and an environment that shares nothing with the test (no MLflow or S3
settings, its own HOME and TMPDIR): the job gets what it needs from its own definition.

One run of one key goes through what a flow worker meets:
1. `ldmflow train --submit` is SIGKILLed mid-training: the job goes on without its submitter;
2. a second driver's `resume` of that run is refused: the job holds the run's lease;
3. a new submitter with the same key re-attaches (no second job) and streams the job's logs; the
   job's driver is then killed: the submitter fails with the job's status and last log lines;
4. the retry (same key) resumes the same MLflow run from its last verified checkpoint as a second
   attempt: the steps continue, the outcome is the final checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.mlflow_server import free_port
from tests.training.run_logs import last_trained_step
from tests.training.runtime.ray_nodes import ray_node, second_node_env, wait_for_port
from tests.training.runtime.test_resume import kill_tree, verified_steps

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
# 40: the job driver was killed at step 8 in a run here, so a kill before the end has 30 steps of margin; 60 only
# made the resumed attempt longer
STEPS = 40
CHECKPOINT_EVERY = 5
OVERRIDES = [f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
             "train.loader_workers=1", "train.checkpoints_to_keep=3"]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with the Jobs API (ray[default]) on 127.0.0.1; yields (dashboard URL, head process)."""
    port, dash = free_port(), free_port()
    env = second_node_env(dict(os.environ), tmp_path_factory.mktemp("head-home"))
    # A local `ray.init()` of an earlier test leaves RAY_AUTH_MODE=token in this process's environment
    # (Ray 2.60 turns token auth on for local clusters), and `ray start` then exits for want of a
    # token. This head runs without auth, said out loud, and so do the submitters this module starts;
    # token auth on a cluster is covered by the two-node tests and the local stack's.
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    env["RAY_AUTH_MODE"] = "disabled"
    # The job's entrypoint runs `python -m training.runtime.job_entry`: this project, from its source.
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT))
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "ray-client-server-port",
                                                    "runtime-env-agent-port")]
    with ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *ports], env) as head:
        wait_for_port(dash, head)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_AUTH_MODE", "disabled")
            yield f"http://127.0.0.1:{dash}", head


def job_driver(head: subprocess.Popen) -> psutil.Process | None:
    """The job's entrypoint process under the head node."""
    for child in psutil.Process(head.pid).children(recursive=True):
        try:
            if "training.runtime.job_entry" in " ".join(child.cmdline()) and child.name().startswith("python"):
                return child
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return None


@pytest.mark.cluster
def test_job_survives_its_submitter_refuses_a_second_driver_and_resumes_after_a_kill(tmp_path, ray_head,
                                                                                     monkeypatch):
    from mlflow import MlflowClient

    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from training.checkpoint.verify import read_state
    from training.config import load_config
    from training.locations import runs_dir, setup_mlflow
    from training.runtime.driver import resume
    from training.runtime.jobs import JobFailed, attempts, jobs_client, run_training_job, submission_id
    from training.runtime.lease import LeaseHeld

    address, head = ray_head
    generate_synthetic(tmp_path / "raw", 40, seed=3)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), samples_per_shard=8,
                             progress=False))
    data = str(tmp_path / "shards")
    samples = tmp_path / "samples"
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setenv("LDMFLOW_SAMPLE_LOG", str(samples))
    monkeypatch.setenv("LDMFLOW_LEASE_TTL_S", "30")
    key = f"test-{uuid.uuid4().hex[:8]}"
    client = jobs_client()
    mlflow_client = MlflowClient(setup_mlflow())
    started = time.monotonic()

    # 1. The submitter is killed once the job has a verified checkpoint; the job goes on.
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    submitter = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--submit", "--job-key", key,
                                  "--data", data, "--no-register", *sets], cwd=ROOT, env=dict(os.environ))
    run_file = Path(runs_dir()) / "ray" / "jobs" / key / "run.json"
    deadline, run_id, verified = time.monotonic() + 400, None, set()
    try:
        while submitter.poll() is None and time.monotonic() < deadline:
            if run_file.exists():
                run_id = json.loads(run_file.read_text())["run_id"]
                verified = verified_steps(Path(runs_dir()) / "ray" / f"train-{run_id}")
                if verified:
                    break
            time.sleep(0.3)
    finally:
        if submitter.poll() is None:
            kill_tree(submitter)
    assert submitter.returncode == -signal.SIGKILL, f"the submitter ended on its own (rc {submitter.returncode})"
    first_attempt = submission_id(key)
    assert [(a.submission_id, a.status) for a in attempts(client, key)] == [(first_attempt, "RUNNING")]
    killed_submitter_at = last_trained_step(samples)
    print(f"submitter killed at step {killed_submitter_at} ({time.monotonic() - started:.0f} s); "
          f"verified checkpoints {sorted(verified)}")

    # 2. A second driver of the same run is refused, naming the job that holds the run.
    with pytest.raises(LeaseHeld) as refused:
        resume(run_id)
    assert f"ray-job {first_attempt}" in str(refused.value) and "\n" not in str(refused.value)

    # 3. A new submitter with the same key follows the running job; the job's driver is killed under it.
    cfg = load_config("configs/tiny.yaml", OVERRIDES)
    follower = Lines()
    logger = logging.getLogger(f"test-job-{key}")
    logger.addHandler(follower)
    logger.setLevel(logging.INFO)
    killed: dict = {}

    def kill_the_job() -> None:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            driver = job_driver(head)
            if driver is not None and follower.lines:  # attached and streaming
                killed["step"] = last_trained_step(samples)
                killed["verified"] = verified_steps(Path(runs_dir()) / "ray" / f"train-{run_id}")
                driver.send_signal(signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_job, daemon=True)
    killer.start()
    with pytest.raises(JobFailed) as failed:
        run_training_job(cfg, data, key=key, log=logger, timeout_s=600)
    killer.join(timeout=30)
    message = str(failed.value)
    assert killed, "the job's driver was never found to kill"
    assert killed["step"] < STEPS, f"the job finished (step {killed['step']}) before the kill"
    assert first_attempt in message and "FAILED" in message and "Last log lines" in message, message
    assert [a.submission_id for a in attempts(client, key)] == [first_attempt], "the follower submitted a job"
    assert any("job_entry" in line or "trains MLflow run" in line for line in follower.lines), follower.lines[:5]
    print(f"job driver killed at step {killed['step']}, verified {sorted(killed['verified'])}")

    # 4. The retry resumes the same run from its last verified checkpoint, as attempt 2.
    outcome = run_training_job(cfg, data, key=key, log=logger, timeout_s=600)
    runs = attempts(client, key)
    assert [(a.submission_id, a.status) for a in runs] == [(first_attempt, "FAILED"),
                                                           (submission_id(key, 2), "SUCCEEDED")]
    assert outcome.run_id == run_id and read_state(outcome.checkpoint_dir).step == STEPS, outcome
    run = mlflow_client.get_run(run_id)
    resumed_from = int(run.data.tags["resume.1.from_step"])
    # The newest checkpoint verified at the kill, or one that completed in the instant before it.
    assert max(killed["verified"]) <= resumed_from <= killed["step"], (resumed_from, killed)
    assert resumed_from >= CHECKPOINT_EVERY  # continued, not restarted
    steps = Counter(m.step for m in mlflow_client.get_metric_history(run_id, "loss"))
    assert set(steps) == set(range(1, STEPS + 1)), sorted(set(range(1, STEPS + 1)) - set(steps))
    assert run.info.status == "FINISHED"
    print(f"resumed from step {resumed_from}; {time.monotonic() - started:.0f} s in all; "
          f"steps logged twice: {sorted(s for s, n in steps.items() if n > 1)}")


def test_timeout_stops_the_job_itself(tmp_path, ray_head, monkeypatch):
    """A call blocked on the job cannot be interrupted by Prefect's task timeout: run_training_job's
    own timeout stops the job on the cluster (not just the wait for it) and says so."""
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from training.config import load_config
    from training.runtime.jobs import JobFailed, attempts, jobs_client, run_training_job, submission_id

    address, _ = ray_head
    monkeypatch.setenv("RAY_ADDRESS", address)
    generate_synthetic(tmp_path / "raw", 16, seed=5)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), samples_per_shard=8,
                             progress=False))
    key = f"timeout-{uuid.uuid4().hex[:8]}"
    # 8 s, not 20: the timeout is the test's own wait; running or still starting, the job is stopped
    # on the cluster all the same (its STOPPED status below), which is what is checked.
    timeout_s = 8
    started = time.monotonic()
    with pytest.raises(JobFailed) as failed:
        run_training_job(load_config("configs/tiny.yaml", ["train.max_steps=100000"]), str(tmp_path / "shards"),
                         key=key, timeout_s=timeout_s, stop_grace_s=20)
    took = time.monotonic() - started
    assert f"ran past its timeout of {timeout_s} s" in str(failed.value)
    assert [(a.submission_id, a.status) for a in attempts(jobs_client(), key)] == [(submission_id(key), "STOPPED")]
    assert took < timeout_s + 20 + 30, took
    print(f"timeout: stopped after {took:.0f} s")


@pytest.mark.cluster
def test_job_stop_command_ends_the_run_within_its_grace(tmp_path, ray_head, monkeypatch):
    """`ldmflow job stop KEY` stops the key's job; with a grace longer than Ray's 3 s the workers save the
    step they are at (between two train.checkpoint_every steps: nothing trained is lost), then the job's
    driver ends its MLflow run (KILLED, tagged with that step) and releases the run's lease before it
    exits; the submitter fails with the job's STOPPED status."""
    from mlflow import MlflowClient

    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from training.locations import runs_dir, setup_mlflow
    from training.runtime.jobs import attempts, jobs_client, submission_id
    from training.runtime.lease import current_holder

    address, _ = ray_head
    monkeypatch.setenv("RAY_ADDRESS", address)
    generate_synthetic(tmp_path / "raw", 16, seed=6)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), samples_per_shard=8,
                             progress=False))
    key = f"stop-{uuid.uuid4().hex[:8]}"
    # Checkpoints every 7 steps: the stop's own lands between two of them (unless the stop took exactly 7).
    sets = [a for o in [*OVERRIDES, "train.max_steps=100000", "train.checkpoint_every=7"] for a in ("--set", o)]
    submitter = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--submit", "--job-key", key,
                                  "--data", str(tmp_path / "shards"), "--no-register", "--stop-grace", "60", *sets],
                                 cwd=ROOT, env=dict(os.environ), stderr=(tmp_path / "submitter.err").open("w"))
    run_file = Path(runs_dir()) / "ray" / "jobs" / key / "run.json"
    try:
        deadline, run_id = time.monotonic() + 300, None
        while time.monotonic() < deadline and submitter.poll() is None:
            if run_file.exists():
                run_id = json.loads(run_file.read_text())["run_id"]
                if verified_steps(Path(runs_dir()) / "ray" / f"train-{run_id}"):
                    break  # training, with the lease held
            time.sleep(0.5)
        assert run_id is not None and submitter.poll() is None, "the job never started training"
        before = max(verified_steps(Path(runs_dir()) / "ray" / f"train-{run_id}"))
        stop = subprocess.run([sys.executable, "-m", "pipelines.cli", "job", "stop", key], cwd=ROOT, check=False,
                              env=dict(os.environ), capture_output=True, text=True, timeout=200)
        assert stop.returncode == 0 and f"stopped Ray job {submission_id(key)}" in stop.stdout, stop
        submitter.wait(timeout=120)
    finally:
        if submitter.poll() is None:
            kill_tree(submitter)
    err = (tmp_path / "submitter.err").read_text()
    assert submitter.returncode == 1 and "STOPPED" in err, err[-2000:]
    assert [a.status for a in attempts(jobs_client(), key)] == ["STOPPED"]
    client = MlflowClient(setup_mlflow())
    assert current_holder(client, run_id) is None, "the stopped driver left its lease"
    run = client.get_run(run_id)
    after = verified_steps(Path(runs_dir()) / "ray" / f"train-{run_id}")
    assert run.info.status == "KILLED"
    assert run.data.tags["stopped_at_step"] == str(max(after)), (run.data.tags, after)
    assert max(after) > before, (before, after)
    assert f"training stopped on request at step {max(after)}; its checkpoint" in err, err[-3000:]
    print(f"stop: checkpointed step {max(after)} (last periodic before the stop: {before})")


def test_flow_cancellation_hook_stops_the_flow_runs_jobs(ray_head, monkeypatch):
    """The flows' on_cancellation hook (pipelines.tasks.stop_training_jobs) runs where the flow-run process
    is gone: it finds the run's jobs by the flow run's id alone and stops them; another flow run's job
    goes on. (The jobs here only sleep: what is tested is the finding and stopping.)"""
    from types import SimpleNamespace

    from pipelines.flows import ldm_pipeline, retrain_flow, train_flow, train_vae_flow
    from pipelines.tasks import stop_training_jobs, training_job_key
    from training.runtime.jobs import attempts, jobs_client, submission_id

    address, _ = ray_head
    monkeypatch.setenv("RAY_ADDRESS", address)
    for flow in (ldm_pipeline, retrain_flow, train_flow, train_vae_flow):
        assert stop_training_jobs in flow.on_cancellation_hooks, flow.name
    client = jobs_client()
    ours, other = str(uuid.uuid4()), str(uuid.uuid4())
    keys = [training_job_key(ours, "vae"), training_job_key(ours, "ldm"), training_job_key(other, "ldm")]
    for key in keys:
        client.submit_job(entrypoint=f"{sys.executable} -c 'import time; time.sleep(600)'",
                          submission_id=submission_id(key))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(attempts(client, k)[0].status != "RUNNING" for k in keys):
            time.sleep(0.5)
        stop_training_jobs(None, SimpleNamespace(id=ours), None)
        assert [attempts(client, k)[0].status for k in keys] == ["STOPPED", "STOPPED", "RUNNING"]
    finally:
        client.stop_job(submission_id(keys[2]))
