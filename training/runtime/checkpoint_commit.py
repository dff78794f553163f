"""Hashing and committing a checkpoint in Ray's upload thread, not in the training thread.

Every file of a checkpoint is listed with its sha256 (files/rank-N.json) and the COMMITTED marker
names each list's digest. Hashing gigabytes of optimizer state takes seconds per checkpoint; done
in the training thread (as it was), every rank waited for the slowest rank's hashing before the
next step. So save_and_report only saves and hands the folder to ``ray.train.report`` with a
:class:`CommittingUpload` as its ``checkpoint_upload_fn``, which Ray runs in its upload thread
(train.checkpoint_upload=async; with sync, inside report) on every rank:

1. hash the rank's files and write its list into the folder (:meth:`CommittingUpload.seal`);
2. upload the folder (Ray's own copy into the checkpoint's storage directory);
3. rank 0 then waits until every rank's list is in storage, and every file each list names is there
   with its listed size, and only then writes train_state.json and COMMITTED into it, the marker last.

So the marker never appears before every rank's files are complete and hashed (it used to be written
before the upload, so storage could hold a marker beside missing shards until the upload finished);
readers still verify everything (training.checkpoint.verify).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from training.checkpoint.layout import COMMITTED, STATE_FILE, CheckpointError, TrainState, file_list_path
from training.checkpoint.writer import committed_marker, write_file_list

log = logging.getLogger(__name__)

COMMIT_WAIT_S = 1800.0
"""How long rank 0 waits for the other ranks' uploads before it gives up on marking a checkpoint."""


@dataclass
class CommittingUpload:
    """Ray's ``checkpoint_upload_fn`` for one rank's checkpoint folder (see the module docstring)."""

    rank: int
    world_size: int
    state: TrainState
    """What rank 0 writes into train_state.json (tag set)."""
    storage: object | None = None
    """Ray's StorageContext, which uploads the folder; None: the running worker's."""
    wait_s: float = COMMIT_WAIT_S
    poll_s: float = 0.5

    def seal(self, local: Path) -> str:
        """Hash this rank's files into files/rank-<rank>.json; returns the list's digest."""
        began = time.monotonic()
        digest = write_file_list(local, self.rank)
        log.info("rank %d hashed step %d's checkpoint files in %.2f s (in the upload thread)", self.rank,
                 self.state.step, time.monotonic() - began)
        return digest

    def __call__(self, checkpoint, checkpoint_dir_name: str):
        import ray.train

        self.seal(Path(checkpoint.path))
        storage = self.storage or ray.train.get_context().get_storage()
        persisted = storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
        if self.rank == 0:
            self.commit(persisted.filesystem, persisted.path)
        return persisted

    def commit(self, fs, path: str) -> None:
        """Rank 0: write train_state.json and COMMITTED into the checkpoint at `path` on pyarrow
        filesystem `fs` once every rank's list and listed files are there."""
        lists = self._wait_for_lists(fs, path)
        state_json = json.dumps(asdict(self.state), indent=2, sort_keys=True).encode()
        marker = committed_marker(self.state, state_json, lists)
        _write(fs, f"{path}/{STATE_FILE}", state_json)
        _write(fs, f"{path}/{COMMITTED}", json.dumps(marker, indent=2, sort_keys=True).encode())

    def _wait_for_lists(self, fs, path: str) -> list[bytes]:
        import pyarrow.fs

        began = time.monotonic()
        while True:
            present = {info.path[len(path) + 1:]: info.size for info in
                       fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
                       if info.type == pyarrow.fs.FileType.File}
            lists = [_complete_list(fs, path, rank, present) for rank in range(self.world_size)]
            if all(lists):
                return lists
            if time.monotonic() - began > self.wait_s:
                missing = [rank for rank, got in enumerate(lists) if not got]
                raise CheckpointError(f"step {self.state.step}: after {self.wait_s:.0f} s the uploads of ranks {missing} "
                                      f"to {path} are not complete; the checkpoint is left unmarked (not resumable)")
            time.sleep(self.poll_s)


def _complete_list(fs, path: str, rank: int, present: dict[str, int]) -> bytes | None:
    """Rank `rank`'s list as stored, when it and every file it names are there with their sizes."""
    rel = file_list_path(Path(), rank).as_posix()
    if rel not in present:
        return None
    with fs.open_input_stream(f"{path}/{rel}") as f:
        data = f.read()
    try:
        files = json.loads(data)["files"]
    except (ValueError, KeyError):
        return None  # still being written (a local copy is not atomic)
    return data if all(present.get(name) == meta["size"] for name, meta in files.items()) else None


def _write(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)
