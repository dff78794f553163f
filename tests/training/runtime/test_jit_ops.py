"""A worker killed while DeepSpeed loads its JIT op leaves torch's lock file behind; the next load on
that node must not wait for it forever (it hung the two-node test after a failed pre-flight)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# What deepspeed.initialize does on the CPU accelerator (deepspeed.comm.torch.TorchBackend), after
# the engine's own load: it must find the op loaded instead of waiting on the lock file.
LOAD_THEN_INITIALIZE = """
from training.runtime.jit_ops import load_deepspeed_ops
from deepspeed.comm.torch import build_shm_op
load_deepspeed_ops()
assert build_shm_op() is not None
print("loaded")
"""


def test_a_lock_file_left_by_a_killed_loader_does_not_hang_the_next_ones(tmp_path):
    from training.runtime.jit_ops import build_directory

    # A node's own extensions folder, with the op already built (copied from this machine's cache
    # when it has it: a build takes ~90 s) and the lock file a killed loader left in it.
    built = build_directory("deepspeed_shm_comm")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    folder = Path(subprocess.run(
        [sys.executable, "-c", "from training.runtime.jit_ops import build_directory as b; "
                               "print(b('deepspeed_shm_comm'))"],
        env=env, capture_output=True, text=True, check=True).stdout.strip())
    if any(built.glob("*.so")):
        shutil.copytree(built, folder, dirs_exist_ok=True)
    (folder / "lock").touch()

    # Two workers of the node load at once: one clears the leftover, neither removes a live lock.
    loaders = [subprocess.Popen([sys.executable, "-c", LOAD_THEN_INITIALIZE], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = []
    try:
        for loader in loaders:
            outputs.append(loader.communicate(timeout=300)[0])
    finally:
        for loader in loaders:
            loader.kill()
    assert [loader.returncode for loader in loaders] == [0, 0], outputs
    assert all("loaded" in out for out in outputs), outputs
    assert sum("a process killed while loading the deepspeed_shm_comm op left it" in out for out in outputs) == 1
    assert not (folder / "lock").exists()


def test_install_builds_the_ops_once_and_later_runs_reuse_them(tmp_path):
    """`make ops` (part of `make install`): every op this accelerator can build is built into the
    environment's extensions folder, and a second run finds them built instead of compiling again."""
    from training.runtime.deepspeed_checks import async_io_available
    from training.runtime.jit_ops import PREBUILT, build_directory

    expected = ["deepspeed_shm_comm", "pin_memory"] + (["async_io"] if async_io_available() else [])
    assert len(PREBUILT) == 3
    # Copied from this environment's build when it has one (compiling all three takes ~5 minutes).
    for name in expected:
        if any(build_directory(name).glob("*.so")):
            shutil.copytree(build_directory(name), tmp_path / name, dirs_exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "training.runtime.jit_ops"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append({name: (tmp_path / name / f"{name}.so").stat().st_mtime_ns for name in expected})
        assert all(str(tmp_path / name) in done.stderr for name in expected), done.stderr
    assert runs[0] == runs[1]
