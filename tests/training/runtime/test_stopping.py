"""The stop board's choice of step (training.runtime.stopping.BoardState): ranks that step in lockstep
and poll after each step all stop at one step, whatever the interleaving and whenever the request
comes. The real path (SIGTERM to a Ray job's driver, the workers' checkpoint) runs in test_ray_job."""

from __future__ import annotations

import random

import pytest

from training.runtime.stopping import BoardState


def run_ranks(ranks: int, seed: int, request_after: int, max_steps: int = 60) -> dict[int, int]:
    """Simulate `ranks` ranks under a random schedule. A rank may finish step s+1 only once every rank
    has finished step s (the gradient all-reduce); after each step it polls. The request comes after
    `request_after` scheduler moves. Returns the step each rank stopped at."""
    rng = random.Random(seed)
    board = BoardState()
    done = [0] * ranks  # steps each rank finished
    polled = [True] * ranks  # whether the rank has polled its latest step
    stopped: dict[int, int] = {}
    moves = 0
    while len(stopped) < ranks:
        moves += 1
        if moves == request_after:
            board.request()
        rank = rng.choice([r for r in range(ranks) if r not in stopped])
        if not polled[rank]:
            stop_at = board.poll(done[rank])
            assert stop_at is None or done[rank] <= stop_at, f"rank {rank} passed the stop step {stop_at}"
            polled[rank] = True
            if stop_at == done[rank]:
                stopped[rank] = done[rank]
            continue
        if done[rank] == max_steps:
            stopped[rank] = max_steps  # trained to the end
            continue
        if all(d >= done[rank] for d in done):  # everyone finished this rank's current step
            done[rank] += 1
            polled[rank] = False
    return stopped


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_every_interleaving_stops_all_ranks_at_one_step(ranks):
    for seed in range(300):
        request_after = random.Random(seed).randint(1, 200)
        stopped = run_ranks(ranks, seed, request_after)
        assert len(set(stopped.values())) == 1, (seed, stopped)


def test_the_stop_step_follows_the_highest_step_reported():
    board = BoardState()
    assert board.poll(5) is None and board.poll(6) is None
    board.request()
    assert board.decided() is None  # decided at the next poll, from what the ranks have reported
    assert board.poll(5) == 8  # the highest step seen (6) plus the lead
    assert board.poll(7) == 8 and board.decided() == 8


def test_sigterm_asks_a_running_launch_to_stop_and_a_second_one_exits(monkeypatch):
    """With no launch running SIGTERM exits at once; during one it posts the stop request (from a thread) and
    returns; a second SIGTERM, or the deadline's own, exits."""
    import os
    import signal
    import threading
    import time
    from types import SimpleNamespace

    from training.runtime import stopping

    posted = threading.Event()
    board = SimpleNamespace(request=SimpleNamespace(remote=posted.set))
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(stopping, "_requested", threading.Event())
    try:
        stopping.install_sigterm(grace_s=stopping.STOP_MARGIN_S + 60)
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs in the main thread at its next bytecode
        monkeypatch.setattr(stopping, "_board", board)
        os.kill(os.getpid(), signal.SIGTERM)
        assert posted.wait(5), "the stop request was not posted"
        with pytest.raises(SystemExit) as second:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert second.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        stopping._deadline_s = None
