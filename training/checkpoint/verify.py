"""The one checkpoint verifier, over the storage layer: a local folder and an ``s3://`` prefix alike.

A checkpoint is trusted only when its ``COMMITTED`` marker is there and parses, ``train_state.json``
and every rank's file list match the sha256 the marker names, and every file a rank listed is
present with its listed size (and its listed sha256, with ``verify_hashes=True``, which resume
uses). Only the marker, the state and the lists are read; the rest is checked against one listing
of the folder, which S3 serves without a download. See training.checkpoint.layout for the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from data_prep import storage
from data_prep.checks import require_plain_name
from training.checkpoint.layout import (
    CHECKPOINT_PREFIX,
    COMMITTED,
    DEEPSPEED_DIR,
    FORMAT,
    STATE_FILE,
    CheckpointError,
    TrainState,
    file_list_path,
    loader_path,
    rng_path,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint folder, as listed: nothing but its COMMITTED marker was read."""

    uri: str
    """The folder: a local path or s3://... URI (what download_checkpoint and as_checkpoint take)."""
    name: str
    """The folder's name, e.g. checkpoint_2026-01-02_03-04-05.123456."""
    step: int | None = None
    """From COMMITTED; None when there is no (readable) marker."""
    tag: str | None = None
    world_size: int | None = None
    marker: dict | None = field(default=None, repr=False)
    """COMMITTED's JSON, None when missing or not JSON."""
    files: Mapping[str, int] = field(default_factory=dict, repr=False)
    """Every file in the folder (relative POSIX path) with its size in bytes, from the listing."""

    @property
    def committed(self) -> bool:
        """Whether a COMMITTED marker is there (not yet whether the files it vouches for are)."""
        return COMMITTED in self.files


def checkpoint_ref(uri: str | Path) -> CheckpointRef:
    """The checkpoint folder at `uri` (local path or s3://), listed once and its marker read."""
    uri = str(uri)
    store = storage.storage_for(uri)
    files = {obj.name: obj.size for obj in store.list(uri)}
    return _ref(store, uri, storage.basename(uri), files)


def list_checkpoints(run: str) -> list[CheckpointRef]:
    """The ``checkpoint_*`` folders of the run at `run` (see run_storage.run_uri), in name order
    (Ray's names are timestamps: oldest first); [] when the run has none or does not exist. One
    recursive listing of the run plus one read of each COMMITTED marker; nothing large is downloaded."""
    store = storage.storage_for(run)
    folders: dict[str, dict[str, int]] = {}
    for obj in store.list(run):
        top, _, rel = obj.name.partition("/")
        if rel and top.startswith(CHECKPOINT_PREFIX):
            folders.setdefault(top, {})[rel] = obj.size
    return [_ref(store, storage.join(run, name), name, files) for name, files in sorted(folders.items())]


def _ref(store: storage.Storage, uri: str, name: str, files: dict[str, int]) -> CheckpointRef:
    marker = _read_marker(store, storage.join(uri, COMMITTED)) if COMMITTED in files else None
    return CheckpointRef(uri=uri, name=name, step=_int(marker, "step"), tag=_str(marker, "tag"),
                         world_size=_int(marker, "world_size"), marker=marker, files=files)


def _read_marker(store: storage.Storage, uri: str) -> dict | None:
    try:
        marker = json.loads(store.read_bytes(uri))
    except storage.NoSuchObjectError:  # deleted since the listing (num_to_keep)
        return None
    except ValueError:
        log.warning("%s is not JSON; that checkpoint is unusable", uri)
        return None
    return marker if isinstance(marker, dict) else None


def _int(marker: dict | None, key: str) -> int | None:
    value = (marker or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(marker: dict | None, key: str) -> str | None:
    value = (marker or {}).get(key)
    return value if isinstance(value, str) else None


def verified_checkpoints(run: str, *, verify_hashes: bool = False) -> list[CheckpointRef]:
    """The committed checkpoints of the run at `run` that verify_checkpoint accepts, the highest step
    first (the later folder on a tie). Checkpoints that fail are logged and left out."""
    candidates = [ref for ref in list_checkpoints(run) if ref.step is not None]
    good = []
    for ref in sorted(candidates, key=lambda r: (r.step, r.name), reverse=True):
        try:
            verify_checkpoint(ref, verify_hashes=verify_hashes)
            good.append(ref)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s (step %s): %s", ref.uri, ref.step, e)
    return good


def latest_verified_checkpoint(run: str, *, verify_hashes: bool = False) -> CheckpointRef | None:
    """The first of verified_checkpoints, or None."""
    return next(iter(verified_checkpoints(run, verify_hashes=verify_hashes)), None)


def read_state(directory: str | Path, *, verify_hashes: bool = False,
               only: Callable[[str], bool] | None = None) -> TrainState:
    """verify_checkpoint of the checkpoint folder at `directory` (a local folder: a checkpoint
    written here, or the partial copy download_checkpoint made; or an s3:// URI)."""
    return verify_checkpoint(checkpoint_ref(directory), verify_hashes=verify_hashes, only=only)


def verify_checkpoint(ref: CheckpointRef, *, verify_hashes: bool = False,
                      only: Callable[[str], bool] | None = None) -> TrainState:
    """The checkpoint's TrainState, after the checks of this module's docstring; CheckpointError
    names the first that fails. `verify_hashes` also streams every listed file through sha256
    (reads it all). `only` narrows the file check to the listed files it selects (a partial local
    copy, e.g. the export's, which fetched the UNet weights but not the optimizer shards); the
    marker, the state and the file lists are always checked."""
    store = storage.storage_for(ref.uri)
    if not ref.committed:
        raise CheckpointError(f"checkpoint {ref.uri} has no {COMMITTED} marker: it is incomplete")
    marker = ref.marker or {}
    try:
        world_size, file_lists = int(marker["world_size"]), dict(marker["file_lists"])
        state_digest = str(marker["train_state_sha256"])
        if marker.get("format") != FORMAT:
            raise ValueError(f"format {marker.get('format')}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{ref.uri}/{COMMITTED} is not a format-{FORMAT} marker ({e}): the checkpoint is corrupt or was "
            "written by an older ldmflow whose checkpoints held pickled state; retrain or resume from a newer one"
        ) from None

    state = TrainState(**json.loads(_read_sealed(store, ref, STATE_FILE, state_digest)))
    if state.world_size != world_size or state.step != marker.get("step") or state.tag != marker.get("tag"):
        raise CheckpointError(f"{ref.uri}/{STATE_FILE} disagrees with {COMMITTED} on step, tag or world size")
    # DeepSpeed loads deepspeed/<tag>/ and the elastic path converts it: the tag must stay inside.
    require_plain_name(state.tag, f"{ref.uri}/{COMMITTED} `tag`", error=CheckpointError)

    deepspeed_files = 0
    for rank in range(world_size):
        list_name = file_list_path(Path(), rank).as_posix()
        if list_name not in file_lists:
            raise CheckpointError(f"{ref.uri}/{COMMITTED} names no file list for rank {rank} of {world_size}")
        listed = json.loads(_read_sealed(store, ref, list_name, file_lists[list_name]))["files"]
        for required in (loader_path(Path(), rank), rng_path(Path(), rank)):
            if required.as_posix() not in listed:
                raise CheckpointError(f"{ref.uri}/{list_name} does not list {required.as_posix()}")
        for rel, meta in listed.items():
            deepspeed_files += rel.startswith(f"{DEEPSPEED_DIR}/{state.tag}/")
            if only is None or only(rel):
                _check_listed(store, ref, rel, meta, verify_hashes)
    if not deepspeed_files:
        raise CheckpointError(f"checkpoint {ref.uri} lists no files under {DEEPSPEED_DIR}/{state.tag}/")
    return state


def _read_sealed(store: storage.Storage, ref: CheckpointRef, rel: str, expected: str) -> bytes:
    """A small file COMMITTED names by digest, read and checked."""
    if rel not in ref.files:
        raise CheckpointError(f"checkpoint {ref.uri} is missing {rel}, which {COMMITTED} names")
    try:
        data = store.read_bytes(storage.join(ref.uri, rel))
    except storage.NoSuchObjectError:
        raise CheckpointError(f"checkpoint {ref.uri} is missing {rel}, which {COMMITTED} names") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{ref.uri}/{rel} does not match the sha256 in {COMMITTED}: it was changed after commit")
    return data


def _check_listed(store: storage.Storage, ref: CheckpointRef, rel: str, meta: dict, verify_hashes: bool) -> None:
    if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
        raise CheckpointError(f"checkpoint {ref.uri} lists a path outside itself: {rel!r}")
    if rel not in ref.files:
        raise CheckpointError(f"checkpoint {ref.uri} is missing {rel} (listed by a rank; not uploaded?)")
    if ref.files[rel] != meta["size"]:
        raise CheckpointError(f"{ref.uri}/{rel} has {ref.files[rel]} bytes but its rank listed {meta['size']}: "
                              "truncated or changed")
    if verify_hashes:
        digest = hashlib.sha256()
        with store.open_read(storage.join(ref.uri, rel)) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{ref.uri}/{rel} does not match the sha256 its rank listed: corrupt or changed")


def listed_files(directory: str | Path, rank: int) -> dict[str, dict]:
    """The files rank `rank` listed in a local checkpoint folder (call after read_state, which
    checks the list's digest)."""
    return json.loads(file_list_path(Path(directory), rank).read_text())["files"]
