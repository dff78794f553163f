"""Loading DeepSpeed's JIT-compiled ops so that a killed worker cannot hang every later one.

torch builds and loads a JIT extension under a lock *file* (``torch.utils.file_baton.FileBaton``: the
file is created on entry and removed on exit). A process killed between the two, which is what losing
a worker, a failed pre-flight or a stopped job does to a worker that is still initialising, leaves the
file behind, and every later load on that node waits for it forever, with no message: the next run
hangs in ``deepspeed.initialize`` before its first step.

Here each op is loaded under a second lock taken with ``flock``, which the kernel releases when its
holder dies. Whoever holds it is the only process of this code loading that op on the node, so a
torch lock file found then was left by a process that died; it is removed (and said) before loading.
DeepSpeed keeps the loaded module per process, so its own later load in ``deepspeed.initialize``
returns it without touching the lock file again.
"""

from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_COMM = "ShareMemCommBuilder"
"""The shared-memory collectives DeepSpeed's CPU accelerator builds for every run (deepspeed.comm)."""


def build_directory(op_name: str) -> Path:
    """Where torch builds `op_name` (TORCH_EXTENSIONS_DIR or its default, per Python and CUDA)."""
    from torch.utils.cpp_extension import _get_build_directory

    # Private, but the one place that knows torch's naming of the folder; it also creates it.
    return Path(_get_build_directory(op_name, verbose=False))


def load_op(builder_name: str):
    """Load DeepSpeed op `builder_name` for the current accelerator, clearing a lock file left by a
    killed process first; None when the accelerator has no such op or it cannot be built here."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    if builder.name in type(builder)._loaded_ops:
        return type(builder)._loaded_ops[builder.name]
    folder = build_directory(builder.name)
    with open(folder.parent / f".{builder.name}.ldmflow-lock", "a") as guard:
        started = time.monotonic()
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
        waited = time.monotonic() - started
        if waited > 1:
            log.info("waited %.0f s for another process on this node to load the %s op", waited, builder.name)
        stale = folder / "lock"
        if stale.exists():
            log.warning("removing %s: a process killed while loading the %s op left it, and torch would wait "
                        "for it forever", stale, builder.name)
            stale.unlink(missing_ok=True)
        return builder.load(verbose=False)


def load_deepspeed_ops() -> None:
    """The JIT ops `deepspeed.initialize` loads, loaded first under the node lock (on an accelerator
    without the op, as on CUDA for the shared-memory one, nothing is loaded: DeepSpeed's own rule)."""
    load_op(SHM_COMM)


PREBUILT = (SHM_COMM, "PinMemoryBuilder", "AsyncIOBuilder")
"""What `make install` builds ahead: the shared-memory collectives every CPU run loads, and the pinned
memory and async I/O ops that offload and NVMe offload load (async I/O only where libaio is present)."""


def prebuild() -> list[str]:
    """Build (or find built) every op of PREBUILT this accelerator can build; the folders of those loaded.

    torch reuses a build only when its ninja file is unchanged, and that file holds the absolute paths of
    the environment's sources: each environment builds once, at install, not in its first run or test.
    """
    from training.runtime.deepspeed_checks import async_io_available

    from deepspeed.accelerator import get_accelerator

    loaded = []
    for name in PREBUILT:
        if name == "AsyncIOBuilder" and not async_io_available():
            continue
        if load_op(name) is not None:
            loaded.append(str(build_directory(get_accelerator().create_op_builder(name).name)))
    return loaded


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    folders = prebuild()
    log.info("DeepSpeed's JIT ops built (%.0f s): %s", time.monotonic() - started,
             " ".join(folders) or "none needed on this accelerator")
