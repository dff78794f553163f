"""Local checkpoint folders waiting for Ray's asynchronous upload are bounded, and those of killed
workers are removed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from training.runtime import checkpointing
from training.runtime.checkpointing import pending_uploads, remove_orphaned_uploads, wait_for_uploads


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def folder(temp_dir, step: int, rank: int, pid: int):
    path = temp_dir / f"{checkpointing.LOCAL_PREFIX}{step}-r{rank}-p{pid}-abc123"
    path.mkdir()
    (path / "part").write_bytes(b"x" * 100)
    return path


def test_a_checkpoint_waits_while_too_many_are_still_uploading(temp_dir):
    """Before, slow storage let ldm-ckpt-* folders pile up in /tmp without bound."""
    first, _ = folder(temp_dir, 5, 0, os.getpid()), folder(temp_dir, 10, 0, os.getpid())
    folder(temp_dir, 5, 1, os.getpid())  # another rank's: not counted for rank 0
    assert len(pending_uploads(0)) == 2
    assert wait_for_uploads(0, 3) == 0.0  # under the bound: no wait
    threading.Timer(0.4, shutil.rmtree, [first]).start()  # Ray finishes the oldest upload
    began = time.monotonic()
    waited = wait_for_uploads(0, 2, poll_s=0.05)
    assert 0.3 < waited and time.monotonic() - began < 5 and len(pending_uploads(0)) == 1
    with pytest.raises(RuntimeError, match="have not finished uploading"):
        wait_for_uploads(0, 1, timeout_s=0.2, poll_s=0.05)


def test_folders_of_dead_workers_are_removed_and_live_ones_kept(temp_dir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = folder(temp_dir, 5, 0, dead.pid)
    mine = folder(temp_dir, 5, 1, os.getpid())
    assert remove_orphaned_uploads() == 1
    assert not orphan.exists() and mine.exists()
