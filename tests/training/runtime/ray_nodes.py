"""Ray nodes for the multi-node tests: each `ray start --block` in its own process group and temp dir on
this machine, the environment of a node that shares nothing with the test, and how to find a node's
id and the training workers it runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

_NOT_ON_THE_SECOND_NODE = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                           "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                           "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                           "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "LDMFLOW_RUNS_DIR", "LDMFLOW_STORAGE",
                           "LDMFLOW_SAMPLE_LOG", "PREFECT_HOME", "RAY_ADDRESS")


def _ray_bin() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else shutil.which("ray")


@contextmanager
def ray_node(args: list[str], env: dict) -> Iterator[subprocess.Popen]:
    """`ray start --block ...` in its own process group and temp dir; stopped (group killed) on exit."""
    temp = tempfile.mkdtemp(prefix="rayn", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = Path(temp) / "start.log"  # what `ray start` printed, for the failure message if it exits
    with open(log, "wb") as out:
        proc = subprocess.Popen([_ray_bin(), "start", "--block", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}",
                                 "--disable-usage-stats", *args], env=env,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    proc.start_log = log
    try:
        yield proc
    finally:
        stop_node(proc)
        shutil.rmtree(temp, ignore_errors=True)


STOP_GRACE_S = 5.0
"""How long a node gets to exit on SIGTERM. `ray start --block` then stops its processes one by one,
each with its own wait (15-37 s per node measured on 2 loaded cores), for nothing a test keeps: its
temp dir is deleted next. The whole group is SIGKILLed after this."""


def stop_node(proc: subprocess.Popen) -> None:
    """Stop `ray start --block` and every process of its group (raylet, GCS, workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_S)
    except ProcessLookupError:  # the group is gone already (a test killed the node)
        proc.wait(timeout=STOP_GRACE_S)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group, the block process's children too
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, f"ray start exited ({proc.returncode}):\n{start_log_tail(proc)}"
            time.sleep(0.5)
    raise TimeoutError(f"no Ray head on port {port}")


def start_log_tail(proc: subprocess.Popen, lines: int = 15) -> str:
    log = getattr(proc, "start_log", None)
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for_nodes(count: int, proc: subprocess.Popen, env: dict, port: int, timeout: float = 90) -> None:
    """Until the cluster has `count` alive nodes (asked through `ray list nodes`-free means: the CLI's status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start --address exited:\n{start_log_tail(proc)}"
        out = subprocess.run([_ray_bin(), "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                             text=True, timeout=60).stdout
        if out.count("node_") >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"the cluster never had {count} nodes")


def node_ids(address: str, env: dict) -> dict[str, str]:
    """{"head_node" | "second_node": Ray node id} of the cluster's alive nodes, by their custom resource."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps({r: n['NodeID'] "
            "for n in ray.nodes() if n['Alive'] for r in n['Resources'] if r.endswith('_node')}))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class Cluster:
    port: int
    head: subprocess.Popen
    second: subprocess.Popen
    env: dict
    """The test's side of the cluster (the head node's and drivers' base environment)."""
    second_env: dict
    ids: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def second_node_env(base: dict, home: Path) -> dict:
    """An environment that shares nothing with the test's: no S3 or MLflow settings or credentials, no
    AWS files or instance metadata, its own HOME and TMPDIR. (TORCH_EXTENSIONS_DIR keeps DeepSpeed's
    compiled CPU op, a build cache a node's image would ship, instead of a 40 s rebuild.)"""
    env = {k: v for k, v in base.items() if k not in _NOT_ON_THE_SECOND_NODE}
    (home / "tmp").mkdir(parents=True)
    env.update(HOME=str(home), TMPDIR=str(home / "tmp"), AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true",
               TORCH_EXTENSIONS_DIR=base.get("TORCH_EXTENSIONS_DIR",
                                             str(Path.home() / ".cache" / "torch_extensions")))
    return env


def train_workers_of(node: subprocess.Popen) -> set[int]:
    """The pids of the Ray Train workers running under `node`. A worker killed by an earlier test can
    linger as a zombie until its raylet reaps it, and any child can exit between the listing and the
    read of its command line: neither is a running worker."""
    try:
        children = psutil.Process(node.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    workers = set()
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "RayTrainWorker" in " ".join(child.cmdline()):
                workers.add(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return workers


def wait_for_no_train_workers(cluster: "Cluster", timeout: float = 60) -> None:
    """After a test killed its driver mid-run: wait (bounded) until Ray has reaped the run's workers,
    so the next test in the module does not start on a cluster whose CPUs they still hold."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(train_workers_of(node) for node in (cluster.head, cluster.second) if node.poll() is None):
            return
        time.sleep(0.5)
