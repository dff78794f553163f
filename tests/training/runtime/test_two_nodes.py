"""Training across two Ray nodes that share nothing but the S3 server (SeaweedFS) and an MLflow
server, surviving the loss of the worker on the second node; and the refusals a multi-node cluster
gets up front (node-local storage and tracking) and from each worker's pre-flight (no credentials).

Both nodes run on this machine (`ray start --head` and `ray start --address=...`, each with one CPU
and a custom resource), so Ray must place one training worker on each. The second node has its own
Ray temp dir, TMPDIR and HOME, and an environment without S3 or MLflow settings or credentials: what
its workers get comes from the driver (the S3 endpoint in the payload; credentials only with
--forward-credentials). Runs track to a real `mlflow server` on 127.0.0.1, not the driver's SQLite
file. Ray registers both nodes under one address, so the test tells them apart by process ancestry:
a worker belongs to the node whose `ray start --block` process it descends from. One cluster serves
the whole module (the node-loss test, which kills the second node, runs last)."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, free_port
from tests.training.run_logs import find_run, sample_log
from tests.training.runtime.ray_nodes import (
    Cluster,
    node_ids,
    ray_node,
    second_node_env,
    train_workers_of,
    wait_for_no_train_workers,
    wait_for_nodes,
    wait_for_port,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
STEPS = 40
CHECKPOINT_EVERY = 5
SAMPLES = 36

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server) -> Iterator[Cluster]:
    """A head node with the test's environment and S3 credentials of its own (like a node with an
    instance role), and a second node with an environment of its own (second_node_env)."""
    env = {**os.environ, **s3_server.env(), "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    second_env = second_node_env(env, tmp_path_factory.mktemp("second-node"))
    port = free_port()
    with ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                   '--resources={"head_node": 1}'], env) as head:
        wait_for_port(port, head)
        with ray_node([f"--address=127.0.0.1:{port}", '--resources={"second_node": 1}'], second_env) as second:
            wait_for_nodes(2, second, env, port)
            yield Cluster(port, head, second, env, second_env, node_ids(f"127.0.0.1:{port}", env))


def shard(tmp_path: Path, data: str, samples: int = SAMPLES) -> str:
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    generate_synthetic(tmp_path / "raw", samples, seed=5)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=data, samples_per_shard=7, progress=False))
    return data


def train_command(data: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", "--data", data, "--no-register", *args]


def test_a_multi_node_cluster_refuses_node_local_storage_and_tracking(tmp_path, cluster):
    """Two nodes, the default storage (runs/ray on each node) and the default tracking store (the
    driver's SQLite file): refused with one line naming both fixes, before an MLflow run or a worker."""
    data = shard(tmp_path, str(tmp_path / "shards"), samples=16)
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LDMFLOW_STORAGE", None)
    proc = subprocess.run(train_command(data, "--set", "tracking.experiment=never-created"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("ldmflow train: error:")]
    assert "the Ray cluster has 2 nodes" in line, line
    assert "--storage s3://" in line and "sqlite:///" in line and "MLFLOW_TRACKING_URI=http://" in line, line
    assert "Traceback" not in proc.stderr
    assert "training train-" not in proc.stderr  # the launch's log line: no worker group was started
    from mlflow import MlflowClient

    from training.locations import tracking_uri

    assert MlflowClient(tracking_uri()).get_experiment_by_name("never-created") is None


def test_a_node_without_credentials_fails_the_preflight_in_seconds(tmp_path, s3_bucket, cluster, mlflow_server):
    """Without --forward-credentials the second node has no S3 credentials: its worker's pre-flight
    fails before step 1, naming the node and the checks, and Ray Train does not restart into it."""
    from mlflow import MlflowClient

    data = shard(tmp_path, f"s3://{s3_bucket}/shards", samples=16)
    run_name = f"no-creds-{uuid.uuid4().hex[:10]}"
    env = {**cluster.env, **_s3_env(), "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    started = time.monotonic()
    proc = subprocess.run(train_command(data, "--storage", f"s3://{s3_bucket}/ray", "--set", "train.max_failures=2",
                                        "--set", f"tracking.run_name={run_name}"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("ldmflow train: error:")]
    assert "pre-flight failed" in line and f"Ray node {cluster.ids['second_node']}" in line, line
    assert cluster.ids["head_node"] not in line, line  # the head's worker has its own credentials: it passed
    assert "cannot read the data" in line and "no AWS credentials" in line, line
    assert "cannot write checkpoint storage" in line and "--forward-credentials" in line, line
    run = find_run(MlflowClient(mlflow_server.uri), run_name)
    trained = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}  # the driver's machine
    assert not trained, trained  # not one step was trained
    # The driver's imports, Ray's worker start-up and the checks; a restart would add the start-up again.
    assert took < 150, took
    print(f"the driver ended {took:.1f} s after it started: {line}")


def _s3_env() -> dict[str, str]:
    """The S3 settings s3_env gave this test process (the driver's)."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def test_gpu_run_on_a_cluster_without_gpus_or_autoscaler_is_refused(tmp_path, cluster):
    """A fixed cluster (started by hand, no GPUs, no autoscaler) and a run that wants GPU workers:
    refused with one message once train.cluster_wait_s is up, before any MLflow run."""
    data = shard(tmp_path, str(tmp_path / "shards"), samples=16)
    started = time.monotonic()
    proc = subprocess.run(
        train_command(data, "--set", "train.use_gpu=true", "--set", "train.cluster_wait_s=5",
                      "--set", "tracking.experiment=never-created"),
        cwd=ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no autoscaler" in proc.stderr and "has 2 CPU, 0 GPU" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 120
    from mlflow import MlflowClient

    from training.locations import tracking_uri

    assert MlflowClient(tracking_uri()).get_experiment_by_name("never-created") is None


def read_sample_log(folder: Path, exclude_pids: set[int], after_step: int) -> list[dict]:
    """The sample log without what the killed attempt trained after the checkpoint it resumed from."""
    # What the killed attempt trained after that checkpoint was redone after the restart.
    return [record for pid, record in sample_log(folder) if pid not in exclude_pids or record["step"] <= after_step]


def epochs_across(folder: Path, killed: dict, start: int) -> dict[int, Counter]:
    """{epoch: Counter of sample keys} over what the run kept training on, across the restart."""
    by_epoch: dict[int, Counter] = defaultdict(Counter)
    for record in read_sample_log(folder, killed["pids"], start):
        for key, epoch in zip(record["keys"], record["epochs"]):
            by_epoch[epoch][key] += 1
    return by_epoch


@pytest.mark.cluster
@pytest.mark.parametrize("lose", ["worker", "node"])
def test_two_node_training_on_s3_survives_losing_the_second_node(tmp_path, s3_bucket, cluster, mlflow_server, lose):
    """The second node has no credentials of its own: --forward-credentials hands it the driver's.
    lose=worker: SIGKILL the training worker on the second node; Ray restarts the group of 2 from
    the latest checkpoint. lose=node: SIGKILL the whole second node (its raylet and everything on
    it) with an elastic run (train.min_workers=1): Ray restarts on the head alone, and the run
    continues on 1 worker from the 2-worker checkpoint (universal checkpoint, data re-split)."""
    from mlflow import MlflowClient

    from training.checkpoint.run_storage import download_checkpoint, run_uri
    from training.checkpoint.verify import latest_verified_checkpoint, read_state

    assert cluster.second.poll() is None, "the second node is gone (the node-loss test must run last)"
    data, store = shard(tmp_path, f"s3://{s3_bucket}/shards-{lose}"), f"s3://{s3_bucket}/ray"
    elastic = ["--set", "train.min_workers=1"] if lose == "node" else []
    run_name = f"two-nodes-{uuid.uuid4().hex[:10]}"
    # The driver's output goes to a file, not a pipe: nobody reads a pipe while the test waits, and a
    # full one (the error reports of a lost node fill 64 KiB) would block the driver mid-run.
    log_path = tmp_path / "driver.log"
    log_file = log_path.open("w")
    driver = subprocess.Popen(
        train_command(data, "--storage", store, "--forward-credentials",
                      "--set", f"train.max_steps={STEPS}", "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                      "--set", "train.log_every=1", "--set", "train.loader_workers=1", "--set", "train.max_failures=2",
                      "--set", f"tracking.run_name={run_name}", *elastic),
        cwd=ROOT, env={**cluster.env, **_s3_env(), "RAY_ADDRESS": cluster.address,
                       "MLFLOW_TRACKING_URI": mlflow_server.uri, "LDMFLOW_SAMPLE_LOG": str(tmp_path / "log")},
        stdout=log_file, stderr=subprocess.STDOUT)
    client = MlflowClient(mlflow_server.uri)
    killed, run = None, None
    try:
        deadline = time.monotonic() + 900  # for the whole run, kill and restart included
        while driver.poll() is None and time.monotonic() < deadline:
            run = find_run(client, run_name)
            if run is not None:
                latest = latest_verified_checkpoint(run_uri(store, f"train-{run.info.run_id}"))
                tags = run.data.tags
                on_second = train_workers_of(cluster.second)
                if latest is not None and latest.step < STEPS - 2 * CHECKPOINT_EVERY and on_second \
                        and "worker.rank1" in tags:
                    # One worker per node: each node holds exactly one of the run's ranks.
                    assert len(on_second) == 1 and len(train_workers_of(cluster.head)) == 1
                    (pid,) = on_second
                    pids = {int(tags[f"worker.rank{r}"].split()[1]) for r in (0, 1)}
                    assert pid in pids, (pid, tags)
                    if lose == "worker":
                        os.kill(pid, signal.SIGKILL)
                    else:
                        os.killpg(cluster.second.pid, signal.SIGKILL)
                    killed = {"pids": pids, "after_step": latest.step}
                    break
            time.sleep(0.5)
        if killed:
            driver.wait(timeout=max(60.0, deadline - time.monotonic()))
    finally:
        log_file.close()
        if driver.poll() is None:
            driver.kill()
            driver.wait()
            wait_for_no_train_workers(cluster)
    out = log_path.read_text(errors="replace")
    assert killed, f"never killed the second node's worker:\n{out[-3000:]}"
    assert driver.returncode == 0, out[-5000:]
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(client.get_run(run.info.run_id).data.params)

    run_id = run.info.run_id
    resumed = client.get_metric_history(run_id, "resumed_from_step")
    assert len(resumed) == 1 and resumed[0].step >= killed["after_step"], (resumed, killed, out[-4000:])
    steps = Counter(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == Counter(range(1, STEPS + 1)), steps  # every step logged once, none twice
    final = client.get_run(run_id).data.tags["checkpoint"]
    assert final.startswith(f"s3://{s3_bucket}/ray/train-{run_id}/checkpoint_")
    state = read_state(download_checkpoint(final, tmp_path / "final"), verify_hashes=True)
    assert state.step == STEPS and state.world_size == (2 if lose == "worker" else 1)

    # Every epoch but the last (which the run ends inside) holds every sample exactly once, across the
    # restart (and the re-split); the last holds none twice. The restart lies inside a complete one.
    start = int(resumed[0].step)
    by_epoch = epochs_across(tmp_path / "log", killed, start)
    last = max(by_epoch)
    incomplete = {e: dict(c) for e, c in by_epoch.items() if e < last and (len(c) != SAMPLES or max(c.values()) != 1)}
    assert not incomplete and sorted(by_epoch) == list(range(min(by_epoch), last + 1)), incomplete
    assert max(by_epoch[last].values()) == 1, by_epoch[last]
    spans = {e for pid, r in sample_log(tmp_path / "log") if r["step"] in (start, start + 1) for e in r["epochs"]}
    assert spans and max(spans) < last, (spans, last)
    # What each rank read from S3 to restore (issue 12, item 1): on the same worker count, its own part
    # and the shared files, never the whole checkpoint (every rank read all of it before).
    total = sum(f.stat().st_size for f in (tmp_path / "final").rglob("*") if f.is_file())
    read = [float(m) * 1e6 for m in re.findall(r"rank \d+ read ([\d.]+) MB from storage for its restore", out)]
    per_rank = ", ".join(f"{r / 1e6:.1f} MB" for r in read)
    print(f"restore reads per rank: {per_rank} of a {total / 1e6:.1f} MB checkpoint")
    assert len(read) >= state.world_size, out[-4000:]  # every rank of the group that resumed
    if lose == "worker":
        assert all(r < 0.9 * total for r in read), (read, total)
    print(f"lost the second node's {lose} after the step-{killed['after_step']} checkpoint; resumed from step "
          f"{start} on {state.world_size} worker(s); epochs 0-{last - 1} complete, {len(spans)} spanning the restart")
