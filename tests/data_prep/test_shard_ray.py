"""Shard tasks on a real Ray cluster (a head node started on 127.0.0.1 by the test) through Ray Data:
the same dataset, byte for byte in identity, as local processes make."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_prep.dataset import read_dataset, verify_dataset
from data_prep.shard import ShardConfig, build_shards
from tests.data_prep.inputs import write_folder

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group; stopping the group stops the node."""
    import ray

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
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_data_executor_matches_local_processes(tmp_path, ray_head):
    write_folder(tmp_path / "src", 24)
    (tmp_path / "src" / "dup.jpg").write_bytes((tmp_path / "src" / "img-0001.jpg").read_bytes())
    (tmp_path / "src" / "dup.txt").write_text("same bytes again")
    local = build_shards(ShardConfig(source=str(tmp_path / "src"), output=str(tmp_path / "local"), resolution=32,
                                     samples_per_shard=4, processes=2, progress=False))
    on_ray = build_shards(ShardConfig(source=str(tmp_path / "src"), output=str(tmp_path / "ray"), resolution=32,
                                      samples_per_shard=4, processes=2, executor="ray", ray_address=ray_head,
                                      progress=False))
    assert on_ray.written == local.written == 24 and on_ray.skipped == local.skipped == {"duplicate": 1}
    assert on_ray.content_id == local.content_id
    assert verify_dataset(str(tmp_path / "ray")).ok
    assert [s.sha256 for s in read_dataset(str(tmp_path / "ray")).shards] == \
        [s.sha256 for s in read_dataset(str(tmp_path / "local")).shards]
