"""A checkpoint's files are hashed in Ray's upload thread, not in the training thread, and its
COMMITTED marker appears only once every rank's files are in storage, complete and listed.

Ray's report is stood in for by a function that runs the upload function on another thread, as
Ray's asynchronous upload does, with Ray's own StorageContext doing the copy into storage."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.training.checkpoint.test_elastic_resume import batch_for, build, train_step
from training.checkpoint import writer
from training.checkpoint.layout import COMMITTED, CheckpointError, TrainState
from training.checkpoint.verify import read_state
from training.checkpoint.writer import rng_state, save_rank_files
from training.config import load_config
from training.loader.plan import LoaderState
from training.runtime.checkpoint_commit import CommittingUpload
from training.runtime.checkpointing import save_and_report
from training.runtime.context import WorkerContext

NAME = "checkpoint_2026-01-01_00-00-00.000000"


def ray_storage(tmp_path: Path):
    from ray.train.v2._internal.execution.storage import StorageContext

    return StorageContext(storage_path=str(tmp_path / "storage"), experiment_dir_name="run")


def test_the_training_thread_does_not_hash(tmp_path, process_group, monkeypatch):
    """Before, write_file_list hashed every file in save_and_report while the other ranks waited."""
    import ray.train

    hashed_on: list[str] = []
    sha256_file = writer.sha256_file

    def recording(path):
        hashed_on.append(threading.current_thread().name)
        return sha256_file(path)

    monkeypatch.setattr(writer, "sha256_file", recording)
    uploads: list[threading.Thread] = []
    storage = ray_storage(tmp_path)

    def report(metrics, checkpoint=None, checkpoint_upload_fn=None, **options):  # Ray's async upload
        if checkpoint_upload_fn is None:  # Ray's own copy
            checkpoint_upload_fn = storage.persist_current_checkpoint
        else:
            checkpoint_upload_fn.storage = storage
        uploads.append(threading.Thread(target=checkpoint_upload_fn, args=(checkpoint, NAME), name="upload"))
        uploads[-1].start()

    monkeypatch.setattr(ray.train, "report", report)
    engine = build(2, "fp32", rank=0, world_size=1)
    train_step(engine, batch_for(0, 0, 1))
    train = load_config("tiny", ["train.checkpoint_upload=async"]).train
    state = TrainState(step=1, samples_seen=4, world_size=1)
    save_and_report(engine, None, state, LoaderState(), torch.Generator(), WorkerContext(0, 1, torch.device("cpu")),
                    {}, train)
    assert threading.current_thread().name not in hashed_on  # nothing hashed before report returned...
    uploads[-1].join()
    assert hashed_on and set(hashed_on) == {"upload"}  # ...every file hashed in the upload thread
    stored = Path(storage.experiment_fs_path) / NAME
    assert read_state(stored, verify_hashes=True).step == 1


def rank_folder(tmp_path: Path, rank: int, upload: CommittingUpload) -> Path:
    local = tmp_path / f"local-r{rank}"
    shard = local / "deepspeed" / "step-00000004" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(bytes(range(256)) * 4096)
    save_rank_files(local, rank, loader={"epoch": 0, "consumed": 8}, rng=rng_state(torch.Generator()))
    upload.seal(local)
    return local


def test_the_marker_waits_for_every_ranks_files(tmp_path):
    import pyarrow.fs

    state = TrainState(step=4, samples_seen=32, world_size=2, tag="step-00000004")
    rank0 = CommittingUpload(0, 2, state, poll_s=0.05)
    locals_ = [rank_folder(tmp_path, r, CommittingUpload(r, 2, state)) for r in range(2)]
    stored = tmp_path / NAME
    shutil.copytree(locals_[0], stored)
    shutil.copytree(locals_[1] / "files", stored / "files", dirs_exist_ok=True)  # rank 1's list, not its files
    shutil.copytree(locals_[1] / "loader", stored / "loader", dirs_exist_ok=True)
    shutil.copytree(locals_[1] / "rng", stored / "rng", dirs_exist_ok=True)
    fs = pyarrow.fs.LocalFileSystem()

    commit = threading.Thread(target=rank0.commit, args=(fs, str(stored)))
    commit.start()
    time.sleep(0.5)
    assert not (stored / COMMITTED).exists()  # rank 1's shard is not there yet
    shutil.copytree(locals_[1] / "deepspeed", stored / "deepspeed", dirs_exist_ok=True)
    commit.join(timeout=30)
    assert read_state(stored, verify_hashes=True).step == 4

    (stored / COMMITTED).unlink()
    shard = next((stored / "deepspeed").rglob("zero_pp_rank_1_*"))
    shard.write_bytes(shard.read_bytes()[:100])  # a cut-off upload
    with pytest.raises(CheckpointError, match=r"uploads of ranks \[1\] .* are not complete"):
        CommittingUpload(0, 2, state, wait_s=0.2, poll_s=0.05).commit(fs, str(stored))
    assert not (stored / COMMITTED).exists()
