"""Stopping a training run on request, with a checkpoint of where it stopped.

A stopped Ray job gets SIGTERM, then SIGKILL `RAY_JOB_STOP_WAIT_TIME_S` later (jobs.py sets it to the
job's stop grace). Exiting at once would lose everything since the last `train.checkpoint_every`
step; so the driver asks the workers to save and return, and only then ends the run:

- The driver's launch owns a board (`BoardState` as a small Ray actor, no CPU) that every rank asks after each
  step "where do we stop?". Ray Train has no channel from the driver to the workers' loop; a named
  actor is one any node of the job reaches.
- The ranks must stop at the same step: saving is a collective, and one rank saving while another
  trains on would hang both. The board picks the step: the first poll after the request fixes it at
  the highest step any rank reported, plus 2. The ranks step in lockstep (every optimizer step
  all-reduces gradients, so none completes step s+1 before all have finished step s) and each polls
  after every step (pipelined: StopWatch), so every rank hears the stop step by the time it reaches it.
- The driver's SIGTERM handler (`install_sigterm`; installed again when the launch starts, since
  `ray.init` sets its own) only sets a flag and, from a thread, posts the
  request; a thread also re-sends SIGTERM to this process at the deadline (the grace less a margin
  for ending the MLflow run and releasing the lease), and the second one exits at once. Outside a
  launch there is nothing to save, and SIGTERM exits at once as before.
- After the workers return, the launch raises `TrainingStopped` (a SystemExit, so the driver's
  cleanup runs as for any exit): the run is KILLED in MLflow, tagged with the stop step, and its latest
  verified checkpoint is that step's, which `--resume` continues from.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

STOP_MARGIN_S = 20.0
"""Of a stop's grace, what is kept for the driver after the workers' checkpoint: the MLflow run's end
(which may wait out an outage briefly) and the lease's release."""
LEAD_STEPS = 2
"""How far past the highest step any rank reported the ranks stop (see the module docstring)."""


class TrainingStopped(SystemExit):
    """The run was stopped on request; `step` is the step its last checkpoint holds (None: the workers
    did not reach a stop checkpoint before the deadline)."""

    def __init__(self, step: int | None):
        super().__init__(128 + signal.SIGTERM)
        self.step = step


class BoardState:
    """The board's decision, as plain Python (the actor wraps it; tests drive it directly)."""

    def __init__(self) -> None:
        self.requested = False
        self.highest: int | None = None
        self.stop_at: int | None = None

    def request(self) -> None:
        self.requested = True

    def poll(self, step: int) -> int | None:
        """A rank finished `step`: the step every rank stops at, once a stop was requested."""
        self.highest = step if self.highest is None else max(self.highest, step)
        if self.requested and self.stop_at is None:
            self.stop_at = self.highest + LEAD_STEPS
        return self.stop_at

    def decided(self) -> int | None:
        return self.stop_at


@dataclass(frozen=True)
class BoardAddress:
    """How a worker finds its launch's board (in the WorkerPayload: a name, never a handle)."""

    name: str
    namespace: str


# --- the driver's side ---------------------------------------------------------------------------

_lock = threading.Lock()
_board = None
"""The current launch's board actor, while a launch runs in this process."""
_requested = threading.Event()
_deadline_s: float | None = None


@contextmanager
def stop_board() -> Iterator[BoardAddress | None]:
    """The board of one launch, for its duration; a stop already requested is posted at once. None
    (no board, no actor process, no polls) unless this process stops on SIGTERM with time to save
    (install_sigterm with a grace over STOP_MARGIN_S)."""
    global _board
    if not _deadline_s or threading.current_thread() is not threading.main_thread():
        yield None
        return
    import ray

    # `ray.init` replaced our handler with its own (sys.exit on SIGTERM): take it back for the launch.
    signal.signal(signal.SIGTERM, _on_sigterm)
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(BoardState)
    address = BoardAddress(name=f"ldmflow-stop-{secrets.token_hex(6)}",
                           namespace=ray.get_runtime_context().namespace)
    board = actor_class.options(name=address.name, namespace=address.namespace).remote()
    with _lock:
        _board = board
    if _requested.is_set():
        board.request.remote()
    try:
        yield address
    finally:
        with _lock:
            _board = None
        ray.kill(board)


def stopped_at() -> int | None:
    """The step the ranks were told to stop at, when a stop was requested during the current launch."""
    import ray

    with _lock:
        board = _board
    if board is None or not _requested.is_set():
        return None
    return ray.get(board.decided.remote(), timeout=30)


def install_sigterm(grace_s: float) -> None:
    """SIGTERM asks the running launch to checkpoint and stop within `grace_s` (less STOP_MARGIN_S);
    with no launch running, or on a second SIGTERM, the process exits at once."""
    global _deadline_s
    _deadline_s = max(grace_s - STOP_MARGIN_S, 0.0)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    with _lock:
        board = _board
    if board is None or _requested.is_set() or not _deadline_s:
        raise SystemExit(128 + signum)
    _requested.set()
    log.warning("stop requested: the workers save a checkpoint and stop (up to %.0f s)", _deadline_s)
    # Not from the handler itself: it interrupts the main thread wherever it is, Ray's calls included.
    threading.Thread(target=_post_request, args=(board, _deadline_s), name="ldmflow-stop", daemon=True).start()


def _post_request(board, deadline_s: float) -> None:
    began = time.monotonic()
    board.request.remote()
    while time.monotonic() - began < deadline_s:
        time.sleep(0.5)
        with _lock:
            if _board is None:  # the launch ended
                return
    log.error("the workers did not save a stop checkpoint within %.0f s; stopping without one", deadline_s)
    os.kill(os.getpid(), signal.SIGTERM)  # the second one exits (_on_sigterm)


# --- the workers' side ---------------------------------------------------------------------------

class StopWatch:
    """A rank's view of the board: `due(step)` after each step says whether to save and return now.

    The poll is pipelined, so a step never waits on the board: `due(step)` reads the answer to the poll
    sent after the step before (long answered by then) and sends this step's. An answer is one step
    late, which LEAD_STEPS covers: a rank's first poll answered after the decision is at most for step
    highest + 1, and its answer is read at the end of step highest + 2, the stop step. (The same
    argument with every interleaving: tests/training/runtime/test_stopping.py.)"""

    def __init__(self, address: BoardAddress | None):
        self.board = None
        self.pending = None
        if address is not None:
            import ray

            try:
                self.board = ray.get_actor(address.name, namespace=address.namespace)
            except ValueError:
                log.warning("stop board %s not found: this launch cannot be stopped with a checkpoint", address.name)

    def due(self, step: int) -> bool:
        if self.board is None:
            return False
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            stop_at = ray.get(self.pending, timeout=30) if self.pending is not None else None
            self.pending = self.board.poll.remote(step)
        except (RayActorError, GetTimeoutError) as e:
            # The driver (its owner) is gone; Ray Train ends the workers soon, and training must not
            # fail on the board's account before that.
            log.warning("stop board unreachable (%s); going on without it", type(e).__name__)
            self.board = None
            return False
        if stop_at is not None and step > stop_at:
            raise RuntimeError(f"stop step {stop_at} was decided after this rank passed it (step {step})")
        return stop_at == step
