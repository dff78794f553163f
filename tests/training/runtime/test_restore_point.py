"""Which checkpoint a restarted worker group resumes from: the newest that verifies on every rank,
each rank fetching and hashing only what it loads."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from data_prep import storage
from tests.training.checkpoint.test_checkpoint_integrity import TAG, WORLD, build_checkpoint
from training.checkpoint.layout import CheckpointError
from training.checkpoint.loading import load_positions, load_rank_files
from training.config import load_config
from training.runtime.context import WorkerContext, WorkerPayload
from training.runtime.restore_point import checkpoint_directory, fetch_verified

OPTIM = "deepspeed/{tag}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


@pytest.fixture
def no_ray_checkpoint(monkeypatch):
    """A group started fresh by Ray (nothing registered): only the run's storage says what exists."""
    import ray.train

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)


def run_with_two_checkpoints(tmp_path: Path) -> Path:
    """A run folder holding the fixture's 2-rank step-4 checkpoint twice, the second named later."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-01_00-10-00.000000"):
        shutil.move(build_checkpoint(tmp_path / name), run / name)
    return run


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only the sha256 check sees it


def payload_for(run: Path) -> WorkerPayload:
    return WorkerPayload(config=load_config("tiny"), data="unused", frozen={}, run_location=str(run))


def test_a_checkpoint_that_fails_its_hash_check_is_skipped(tmp_path, no_ray_checkpoint, caplog):
    """Before, the newest size-valid checkpoint was picked and failed on every restart."""
    run = run_with_two_checkpoints(tmp_path)
    older, newer = sorted(run.iterdir())
    flip_a_byte(newer / OPTIM.format(tag=TAG, rank=0))
    ctx = WorkerContext(rank=0, world_size=WORLD, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING), checkpoint_directory(payload_for(run), ctx) as restore:
        directory, saved, _ = restore
        assert Path(directory) == older and saved.step == 4
    assert f"skipping the step-4 checkpoint {newer}: on rank 0" in caplog.text and "sha256" in caplog.text

    flip_a_byte(older / OPTIM.format(tag=TAG, rank=0))
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        with checkpoint_directory(payload_for(run), ctx):
            pass


def test_a_rank_does_not_verify_what_it_does_not_load(tmp_path, no_ray_checkpoint):
    run = run_with_two_checkpoints(tmp_path)
    newest = sorted(run.iterdir())[-1]
    flip_a_byte(newest / OPTIM.format(tag=TAG, rank=0))  # rank 0's partition: rank 1 never reads it
    ctx = WorkerContext(rank=1, world_size=WORLD, device=torch.device("cpu"))
    with checkpoint_directory(payload_for(run), ctx) as (directory, saved, _):
        assert Path(directory) == newest and saved.step == 4


def test_from_s3_each_rank_downloads_only_its_part(tmp_path, s3_bucket):
    ckpt = build_checkpoint(tmp_path / "local")
    uri = f"s3://{s3_bucket}/run/checkpoint_a"
    store = storage.storage_for(uri)
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        store.put_file(str(path), storage.join(uri, path.relative_to(ckpt).as_posix()))
    total = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    fetched = {}
    for rank in range(WORLD):
        began = storage.s3_bytes_read()
        local, saved, _ = fetch_verified(uri, tmp_path / f"r{rank}", WorkerContext(rank, WORLD, torch.device("cpu")))
        read = storage.s3_bytes_read() - began
        files = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
        fetched[rank] = files
        assert read == sum(files.values()) < total  # each byte read from S3 once, and only what it loads
        assert OPTIM.format(tag=TAG, rank=rank) in files and f"rng/rank-{rank}.pt" in files
        other = 1 - rank
        assert OPTIM.format(tag=TAG, rank=other) not in files and f"rng/rank-{other}.pt" not in files
        assert {f"loader/rank-{r}.json" for r in range(WORLD)} <= set(files)  # every position: re-split
        # What restore reads from it: every rank's position, this rank's RNG, nothing more.
        assert len(load_positions(local, WORLD)) == WORLD and load_rank_files(local, rank)[1]["generator"] is not None
    assert "ema.safetensors" not in fetched[1]
    assert all(sum(files.values()) < total for files in fetched.values())


def test_the_outcome_is_the_final_checkpoint_even_when_ray_never_registered_it(tmp_path):
    """Before, the run reported Ray's last registered checkpoint (an older step) and the export
    published that, or failed with "finished without a checkpoint"."""
    from tests.training.runtime.test_resume_errors import commit_checkpoint
    from training.runtime.launcher import final_checkpoint

    run = tmp_path / "run"
    older, final = run / "checkpoint_2026-01-01_00-00-00.000000", run / "checkpoint_2026-01-01_00-10-00.000000"
    commit_checkpoint(older, step=4, config={}, frozen={})
    commit_checkpoint(final, step=8, config={}, frozen={})
    assert final_checkpoint(str(older), str(run), 8) == str(final)  # registered: only the older one
    assert final_checkpoint(None, str(run), 8) == str(final)  # registered: none
    assert final_checkpoint(str(final), str(run), 8) == str(final)
    with pytest.raises(RuntimeError, match="without a verified step-12 checkpoint .*newest: step 8"):
        final_checkpoint(str(final), str(run), 12)
