"""Shard tasks on a real Ray cluster (a head node started on 127.0.0.1 by the test) through Ray Data:
the same dataset, byte for byte in identity, as local processes make."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from data_prep.dataset import read_dataset, verify_dataset
from data_prep.shard import ShardConfig, build_shards
from tests.data_prep.inputs import write_folder
from tests.training.runtime.ray_nodes import stop_node, wait_for_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(monkeypatch):
    """`ray start --head --block` in its own process group; stopping the group stops the node.

    Ray 2.60 clusters started this way require an auth token; the head and this test's driver share
    one made here (not ~/.ray/auth_token, which another cluster on the machine may own).
    """
    import secrets

    # Ray reads the mode when it is imported, so the driver must be a new process too (the CLI).
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))

    beside = Path(sys.executable).parent / "ray"  # the venv's own, like the `weed` binary
    ray_bin = str(beside) if beside.exists() else shutil.which("ray")
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
                             "--disable-usage-stats"], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        wait_for_port(port, head)
        yield address
    finally:
        stop_node(head)  # SIGTERM, then SIGKILL for the group after a short grace (it took 33 s)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_data_executor_matches_local_processes(tmp_path, ray_head):
    write_folder(tmp_path / "src", 24)
    (tmp_path / "src" / "dup.jpg").write_bytes((tmp_path / "src" / "img-0001.jpg").read_bytes())
    (tmp_path / "src" / "dup.txt").write_text("same bytes again")
    local = build_shards(ShardConfig(source=str(tmp_path / "src"), output=str(tmp_path / "local"), resolution=32,
                                     samples_per_shard=4, processes=2, progress=False))
    # Through the CLI, as a user on a cluster node would run it.
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "shard", "--source", str(tmp_path / "src"),
                           "--output", str(tmp_path / "ray"), "--resolution", "32", "--samples-per-shard", "4",
                           "--processes", "2", "--ray-address", ray_head, "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    on_ray = read_dataset(str(tmp_path / "ray"))
    assert "Ray" in proc.stderr  # the tasks ran there: the executor logs the cluster's CPUs
    assert on_ray.total_samples == local.written == 24
    assert on_ray.skipped() == local.skipped == {"duplicate": 1}
    assert on_ray.content_id == local.content_id
    assert verify_dataset(str(tmp_path / "ray")).ok
    assert [s.sha256 for s in read_dataset(str(tmp_path / "ray")).shards] == \
        [s.sha256 for s in read_dataset(str(tmp_path / "local")).shards]

    # Incremental on Ray: the tasks find what the first part holds through its digest file.
    write_folder(tmp_path / "src", 3, start=100)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "shard", "--source", str(tmp_path / "src"),
                           "--output", str(tmp_path / "ray"), "--resolution", "32", "--samples-per-shard", "4",
                           "--ray-address", ray_head, "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_dataset(str(tmp_path / "ray")).total_samples == 27
    assert re.search(r"already in dataset\s+25\b", proc.stdout), proc.stdout
