"""A trainer killed by SIGKILL takes its loader processes with it (training.loader.lifetime)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from data_prep.shard import ShardConfig, build_shards
from data_prep.synth import generate_synthetic

ROOT = Path(__file__).resolve().parents[3]

TRAINER = textwrap.dedent("""
    import os, signal, sys

    import psutil

    from training.loader.stream import ShardStream

    if __name__ == "__main__":  # the fork server imports __main__ again
        stream = ShardStream(sys.argv[1], rank=0, world_size=1, batch_size=4, resolution=32, seed=0,
                             loader_workers=2)
        batches = iter(stream)
        next(batches)  # the fork server and both workers are up (held: a dropped iterator stops them)
        me = os.getpid()
        mine = [p.pid for p in psutil.process_iter() if me in {q.pid for q in p.parents()}]
        with open(sys.argv[2], "w") as f:
            f.write(" ".join(map(str, mine)))
        os.kill(os.getpid(), signal.SIGKILL)  # a lost node, a Ray restart, `ray stop`
""")


def test_loader_processes_die_with_a_killed_trainer(tmp_path):
    """Before, the fork server and its two workers (about 200 MB each) were still running long after."""
    generate_synthetic(tmp_path / "raw", 24, seed=1, image_size=32)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), resolution=32,
                             samples_per_shard=6, progress=False))
    (tmp_path / "trainer.py").write_text(TRAINER)
    pids_file = tmp_path / "pids"
    # Output to files, not pipes: a pipe a surviving child holds open would block this test instead.
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.run([sys.executable, str(tmp_path / "trainer.py"), str(tmp_path / "shards"), str(pids_file)],
                              cwd=ROOT, stdout=log, stderr=log, timeout=180)
    assert proc.returncode == -9, (tmp_path / "log").read_text()[-2000:]
    children = [int(p) for p in pids_file.read_text().split()]
    assert len(children) >= 3  # the fork server and its two workers (and the resource tracker)
    deadline = time.monotonic() + 30
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    for pid in alive:  # leave nothing behind whatever the outcome
        os.kill(pid, 9)
    assert not alive, f"still running after the trainer was killed: {alive}"
