"""Loader processes die with the trainer that started them.

The DataLoader's workers are forked by a fork server the trainer starts, so the trainer is neither
their parent nor what torch's worker watchdog watches (it watches its parent: the fork server). A
trainer killed by SIGKILL (a lost node, a Ray restart, `ray stop`) used to leave the fork server and
its workers running, about 200 MB each, until the machine ran out of memory after enough restarts.
Each of them now asks the kernel to kill it when its parent goes (PR_SET_PDEATHSIG): the fork server
when the trainer does, the workers when the fork server does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux; elsewhere nothing). A parent already gone
    (re-parented to init before this ran) ends it at once."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)
