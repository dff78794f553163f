"""Training across two Ray nodes with shards and checkpoints on S3, surviving the loss of the worker on
the second node.

Both nodes run on this machine (`ray start --head` and `ray start --address=...`, each with one CPU,
its own temp dir and a custom resource), so Ray must place one training worker on each. Ray
registers both nodes under the machine's interface address, so the test tells them apart by process
ancestry: a worker belongs to the node whose `ray start --block` process it descends from. Nothing
is shared between the nodes but the S3 server (SeaweedFS) and MLflow."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from tests.training.run_logs import find_run, sample_log

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
STEPS = 40
CHECKPOINT_EVERY = 5
SAMPLES = 36


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else shutil.which("ray")


@contextmanager
def ray_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block ...` in its own process group and temp dir; stopped (group killed) on exit."""
    temp = tempfile.mkdtemp(prefix="rayn", dir="/tmp")  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen([_ray_bin(), "start", "--block", "--num-cpus=1", f"--temp-dir={temp}",
                             "--disable-usage-stats", *args], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, "ray start exited"
            time.sleep(0.5)
    raise TimeoutError(f"no Ray head on port {port}")


def wait_for_nodes(count: int, proc: subprocess.Popen, env: dict, port: int, timeout: float = 90) -> None:
    """Until the cluster has `count` alive nodes (asked through `ray list nodes`-free means: the CLI's status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start --address exited"
        out = subprocess.run([_ray_bin(), "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                             text=True, timeout=60).stdout
        if out.count("node_") >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"the cluster never had {count} nodes")


def train_workers_of(node: subprocess.Popen) -> set[int]:
    return {p.pid for p in psutil.Process(node.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())}


def read_sample_log(folder: Path, exclude_pids: set[int], after_step: int) -> list[dict]:
    """The sample log without what the killed attempt trained after the checkpoint it resumed from."""
    # What the killed attempt trained after that checkpoint was redone after the restart.
    return [record for pid, record in sample_log(folder) if pid not in exclude_pids or record["step"] <= after_step]


@pytest.mark.parametrize("lose", ["worker", "node"])
def test_two_node_training_on_s3_survives_losing_the_second_node(tmp_path, s3_bucket, lose):
    """lose=worker: SIGKILL the training worker on the second node; Ray restarts the group of 2 from
    the latest checkpoint. lose=node: SIGKILL the whole second node (its raylet and everything on
    it) with an elastic run (train.min_workers=1): Ray restarts on the head alone, and the run
    continues on 1 worker from the 2-worker checkpoint (universal checkpoint, data re-split)."""
    from mlflow import MlflowClient

    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from training.checkpoint.run_storage import download_checkpoint, run_uri
    from training.checkpoint.verify import latest_verified_checkpoint, read_state
    from training.locations import tracking_uri

    data, store = f"s3://{s3_bucket}/shards-{lose}", f"s3://{s3_bucket}/ray"
    generate_synthetic(tmp_path / "raw", SAMPLES, seed=5)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=data, samples_per_shard=7, progress=False))

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    elastic = ["--set", "train.min_workers=1"] if lose == "node" else []
    with ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                   '--resources={"head_node": 1}'], env) as head:
        wait_for_port(port, head)
        with ray_node([f"--address=127.0.0.1:{port}", '--resources={"second_node": 1}'], env) as second:
            wait_for_nodes(2, second, env, port)
            run_name = f"two-nodes-{uuid.uuid4().hex[:10]}"
            driver = subprocess.Popen(
                [sys.executable, "-m", "pipelines.cli", "train", "--data", data, "--storage", store, "--no-register",
                 "--set", f"train.max_steps={STEPS}", "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                 "--set", "train.log_every=1", "--set", "train.loader_workers=1", "--set", "train.max_failures=2",
                 "--set", f"tracking.run_name={run_name}", *elastic],
                cwd=ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "LDMFLOW_SAMPLE_LOG": str(tmp_path / "log")},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            client = MlflowClient(tracking_uri())
            killed, run, out = None, None, ""
            try:
                deadline = time.monotonic() + 600
                while driver.poll() is None and time.monotonic() < deadline:
                    run = find_run(client, run_name)
                    if run is not None:
                        latest = latest_verified_checkpoint(run_uri(store, f"train-{run.info.run_id}"))
                        tags = run.data.tags
                        on_second = train_workers_of(second)
                        if latest is not None and latest.step < STEPS - 2 * CHECKPOINT_EVERY and on_second \
                                and "worker.rank1" in tags:
                            # One worker per node: each node holds exactly one of the run's ranks.
                            assert len(on_second) == 1 and len(train_workers_of(head)) == 1
                            (pid,) = on_second
                            pids = {int(tags[f"worker.rank{r}"].split()[1]) for r in (0, 1)}
                            assert pid in pids, (pid, tags)
                            if lose == "worker":
                                os.kill(pid, signal.SIGKILL)
                            else:
                                os.killpg(second.pid, signal.SIGKILL)
                            killed = {"pids": pids, "after_step": latest.step}
                            break
                    time.sleep(0.5)
                out, _ = driver.communicate(timeout=600)
            finally:
                if driver.poll() is None:
                    driver.kill()
            assert killed, f"never killed the second node's worker:\n{out[-3000:]}"
            assert driver.returncode == 0, out[-5000:]

    run_id = run.info.run_id
    resumed = client.get_metric_history(run_id, "resumed_from_step")
    assert len(resumed) == 1 and resumed[0].step >= killed["after_step"], (resumed, killed, out[-4000:])
    steps = Counter(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == Counter(range(1, STEPS + 1)), steps  # every step logged once, none twice
    final = client.get_run(run_id).data.tags["checkpoint"]
    assert final.startswith(f"s3://{s3_bucket}/ray/train-{run_id}/checkpoint_")
    state = read_state(download_checkpoint(final, tmp_path / "final"), verify_hashes=True)
    assert state.step == STEPS and state.world_size == (2 if lose == "worker" else 1)

    # Within each epoch every sample was trained on once, across the restart (and the re-split).
    start = int(resumed[0].step)
    by_epoch: dict[int, Counter] = defaultdict(Counter)
    for record in read_sample_log(tmp_path / "log", killed["pids"], start):
        for key, epoch in zip(record["keys"], record["epochs"]):
            by_epoch[epoch][key] += 1
    assert all(max(c.values()) == 1 for c in by_epoch.values()), by_epoch
    assert sum(1 for c in by_epoch.values() if sum(c.values()) == SAMPLES) >= 2
    print(f"lost the second node's {lose} after the step-{killed['after_step']} checkpoint; "
          f"resumed from step {start} on {state.world_size} worker(s)")


def test_gpu_run_on_a_cluster_without_gpus_or_autoscaler_is_refused(tmp_path):
    """A fixed cluster (a head started by hand, no GPUs, no autoscaler) and a run that wants GPU
    workers: refused with one message once train.cluster_wait_s is up, before any MLflow run."""
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    generate_synthetic(tmp_path / "raw", 16, seed=1)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), progress=False))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    with ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                   "--num-gpus=0"], env) as head:
        wait_for_port(port, head)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "train", "--data", str(tmp_path / "shards"), "--no-register",
             "--set", "train.use_gpu=true", "--set", "train.cluster_wait_s=5",
             "--set", "tracking.experiment=never-created"],
            cwd=ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no autoscaler" in proc.stderr and "has 1 CPU, 0 GPU" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 120
    from mlflow import MlflowClient

    from training.locations import tracking_uri

    assert MlflowClient(tracking_uri()).get_experiment_by_name("never-created") is None
