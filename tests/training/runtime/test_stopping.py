"""The stop board's choice of step (training.runtime.stopping.BoardState): ranks that step in lockstep
and poll after each step (pipelined, as StopWatch does) all stop at one step, whatever the interleaving
and whenever the request comes; with a lead of 1 step instead of 2 some rank passes the stop step.
The real path (SIGTERM to a Ray job's driver, the workers' checkpoint) runs in test_ray_job."""

from __future__ import annotations

import random

import pytest

from training.runtime.stopping import BoardState


def run_ranks(ranks: int, seed: int, request_after: int, max_steps: int = 60) -> dict[int, int]:
    """Simulate `ranks` ranks polling as StopWatch does, under a random schedule. A rank may finish step s+1
    only once every rank has finished step s (the gradient all-reduce). After each step it reads the answer to
    its previous poll (waiting for the board to get to it) and sends this step's. The board answers the polls
    in the order they were sent, at moments the schedule picks; the request comes after `request_after`
    scheduler moves. Returns the step each rank stopped at."""
    rng = random.Random(seed)
    board = BoardState()
    done = [0] * ranks  # steps each rank finished
    read = [True] * ranks  # whether the rank has polled its latest step
    queue: list[tuple[int, int]] = []  # (rank, step) polls sent, not yet answered
    answers: dict[tuple[int, int], int | None] = {}
    stopped: dict[int, int] = {}

    def answer_next() -> None:
        rank, step = queue.pop(0)
        answers[rank, step] = board.poll(step)

    moves = 0
    while len(stopped) < ranks:
        moves += 1
        # A rank that stopped alone leaves the others waiting at its next all-reduce: the hang this prevents.
        assert moves < 100 * max_steps * ranks, f"ranks {sorted(stopped)} stopped, the others wait for them"
        if moves == request_after:
            board.request()
        if queue and rng.random() < 0.3:
            answer_next()
            continue
        rank = rng.choice([r for r in range(ranks) if r not in stopped])
        step = done[rank]
        if not read[rank]:
            stop_at = None
            if step > 1:  # the answer to the previous step's poll, waited for
                while (rank, step - 1) not in answers:
                    answer_next()
                stop_at = answers[rank, step - 1]
            assert stop_at is None or step <= stop_at, f"rank {rank} passed the stop step {stop_at}"
            queue.append((rank, step))
            read[rank] = True
            if stop_at == step:
                stopped[rank] = step
            continue
        if step == max_steps:
            stopped[rank] = max_steps  # trained to the end
            continue
        if all(d >= step for d in done):  # everyone finished this rank's current step
            done[rank] += 1
            read[rank] = False
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
