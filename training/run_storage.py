"""Where Ray Train keeps a run, on a local (shared) path or under ``s3://bucket/prefix``, and how the
driver finds, verifies and fetches the checkpoints in it without Ray.

Ray Train 2.60 (v2) writes a run named ``name`` under the storage path as::

    <storage>/<name>/.validate_storage_marker           empty; written when a trainer starts
    <storage>/<name>/checkpoint_manager_snapshot.json   Ray's list of registered checkpoints
    <storage>/<name>/checkpoint_<%Y-%m-%d_%H-%M-%S.%f>/  one per ray.train.report(checkpoint=...):
                                                        every rank's folder copied into it

The checkpoint folders hold training.checkpointing's layout (COMMITTED, files/rank-N.json, ...).
A new trainer with the same name and storage, even after the earlier one finished, reads the
snapshot and hands its latest registered checkpoint to the workers (``ray.train.get_checkpoint()``;
tested in tests/training/test_run_storage.py). The readers here ignore the snapshot and trust a
checkpoint only by its own COMMITTED marker and file lists, so a checkpoint Ray never registered
(a rank's upload never finished) or half deleted (``num_to_keep``) is judged by what is there.

S3 goes two ways: Ray gets a ``pyarrow.fs.S3FileSystem`` (its upload client); everything read here
goes through ``data_prep.storage`` (boto3), like every other URI the project touches. Both take the
endpoint, credentials and region from the standard AWS environment (AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or a profile,
AWS_REGION / AWS_DEFAULT_REGION).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from data_prep import storage
from data_prep.storage import StorageError
from training.checkpointing import (
    COMMITTED,
    DEEPSPEED_DIR,
    FILES_DIR,
    FORMAT,
    STATE_FILE,
    CheckpointError,
    TrainState,
    loader_path,
    rng_path,
)

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.train

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
"""Ray names checkpoint folders checkpoint_<%Y-%m-%d_%H-%M-%S.%f> unless report() names them."""

_TRAIN_TIMEOUTS = {"connect_timeout": 5.0, "request_timeout": 30.0, "max_attempts": 3}
"""Ray's upload client. request_timeout is a stall limit (curl: under 1 byte/s for that long), not a
cap on a transfer, so a large checkpoint is fine; it outlasts a server pausing to assemble a big
multipart upload, where the SDK default (3 s, pyarrow's docs say) would fail the request. A refused connection fails at
once. Pickling keeps the timeouts but not the retry strategy: on the workers, which unpickle the
filesystem from the RunConfig, pyarrow's default of 3 attempts applies, the same number."""
_PROBE_TIMEOUTS = {"connect_timeout": 3.0, "request_timeout": 3.0, "max_attempts": 2}
"""check_run_storage's client: a dead or hung endpoint fails the preflight in seconds."""
_PROBE_NAME = ".ldmflow-run-storage-probe-"
_AWS_ERROR = re.compile(r"AWS Error ([A-Z_]+)")
_DOWNLOAD_THREADS = 4


# --- storage for RunConfig ------------------------------------------------------------------


def ray_storage(uri: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    A local path (or file:// URI) becomes an absolute path with no filesystem (Ray uses the local
    one; on a cluster it must be a filesystem every node mounts). ``s3://bucket/prefix`` becomes
    ``("bucket/prefix", S3FileSystem)``: with a filesystem, Ray wants the path without its scheme.

    The filesystem carries the endpoint, region and timeouts, never credentials: Ray pickles it to
    every worker, and each process (a node's own role or environment) resolves credentials through
    the AWS SDK's chain, the way data_prep.storage.env_for_workers expects cluster nodes to.
    """
    if not storage.is_s3(uri):
        return str(Path(storage.local_path(uri)).resolve()), None
    path = _s3_path(uri)
    return path, _s3_filesystem(path.split("/", 1)[0], **_TRAIN_TIMEOUTS)


def _s3_path(uri: str) -> str:
    """`s3://bucket//a/b/` -> "bucket/a/b": the form pyarrow's S3FileSystem (and so Ray) takes."""
    bucket, key = storage._split_s3(uri)
    return "/".join(p for p in (bucket, key.strip("/")) if p)


def _s3_filesystem(bucket: str, *, connect_timeout: float, request_timeout: float,
                  max_attempts: int) -> pyarrow.fs.S3FileSystem:
    """A pyarrow S3 client for the environment's endpoint (or AWS S3), region and credential chain."""
    import pyarrow.fs

    endpoint = storage._env_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options: dict = {}
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
            raise StorageError(f"S3 endpoint {endpoint!r} must be scheme://host[:port], e.g. http://127.0.0.1:8333; "
                               "fix AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)")
        # Path-style addressing (host/bucket/key) follows from endpoint_override in pyarrow.
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
        region = region or "us-east-1"
    elif not region:
        region = _bucket_region(bucket)
    return pyarrow.fs.S3FileSystem(
        region=region, connect_timeout=connect_timeout, request_timeout=request_timeout,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)


def _bucket_region(bucket: str) -> str | None:
    """AWS S3 answers requests for a bucket only in its region; with none configured, ask S3 (as
    pyarrow's from_uri does). None leaves it to the SDK (us-east-1), whose error then names it."""
    import pyarrow.fs

    try:
        return pyarrow.fs.resolve_s3_region(bucket)
    except (OSError, ValueError) as e:
        log.warning("could not look up the region of bucket %s (%s); set AWS_DEFAULT_REGION", bucket, e)
        return None


def check_run_storage(uri: str) -> None:
    """Raise one StorageError, in seconds, when runs cannot be written under `uri`: call before
    training, so that an unwritable path, a missing bucket, refused credentials or a dead endpoint
    is one message instead of a failed (or endlessly retried) first checkpoint.

    For S3 it writes and deletes a probe object twice: through boto3 (data_prep.storage, whose
    messages name the cause) and through the pyarrow client Ray uploads with, since the two resolve
    credentials separately.
    """
    if not storage.is_s3(uri):
        storage.storage_for(uri).check_writable(uri)
        return
    fast = storage.S3Storage(max_attempts=_PROBE_TIMEOUTS["max_attempts"],
                             connect_timeout=_PROBE_TIMEOUTS["connect_timeout"],
                             read_timeout=_PROBE_TIMEOUTS["request_timeout"])
    fast.check_writable(uri)
    path = _s3_path(uri)
    fs = _s3_filesystem(path.split("/", 1)[0], **_PROBE_TIMEOUTS)
    probe = f"{path}/{_PROBE_NAME}{secrets.token_hex(8)}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"probe")
        fs.delete_file(probe)
    except OSError as e:
        raise _pyarrow_error(e, uri, fast.endpoint) from e


def _pyarrow_error(e: OSError, uri: str, endpoint: str) -> StorageError:
    match = _AWS_ERROR.search(str(e))
    code = match.group(1) if match else ""
    where = f"{uri} at {endpoint} through pyarrow (Ray Train's S3 client)"
    if code == "NETWORK_CONNECTION":
        return StorageError(f"cannot write {where}: endpoint unreachable ({e}); start the server or fix "
                            "AWS_ENDPOINT_URL")
    if code == "NO_SUCH_BUCKET":
        return StorageError(f"cannot write {where}: the bucket does not exist; create it or fix the URI")
    if code in ("SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "ACCESS_DENIED", "EXPIRED_TOKEN"):
        return StorageError(
            f"cannot write {where}: S3 refused it ({code}) although boto3 could write there; pyarrow resolves "
            "credentials itself: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile it can read)")
    return StorageError(f"cannot write {where}: {e}")


def run_uri(storage_uri: str, name: str) -> str:
    """The URI of run `name` under `storage_uri`, where Ray puts it: an absolute local path or
    ``s3://bucket/prefix/name``."""
    if not name or "/" in name or name in (".", ".."):
        raise StorageError(f"run name {name!r} must be one path component (no '/')")
    if storage.is_s3(storage_uri):
        return storage.join(storage_uri, name)
    return str(Path(storage.local_path(storage_uri)).resolve() / name)


# --- finding checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    """One ``checkpoint_*`` folder of a run, as listed: nothing but its COMMITTED marker was read."""

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


def list_checkpoints(run: str) -> list[CheckpointRef]:
    """The ``checkpoint_*`` folders of the run at `run` (see run_uri), in name order (Ray's names are
    timestamps: oldest first); [] when the run has none or does not exist. One recursive listing of
    the run plus one read of each COMMITTED marker; nothing large is downloaded."""
    store = storage.storage_for(run)
    folders: dict[str, dict[str, int]] = {}
    for obj in store.list(run):
        top, _, rel = obj.name.partition("/")
        if rel and top.startswith(CHECKPOINT_PREFIX):
            folders.setdefault(top, {})[rel] = obj.size
    refs = []
    for name, files in sorted(folders.items()):
        uri = storage.join(run, name)
        marker = _read_marker(store, storage.join(uri, COMMITTED)) if COMMITTED in files else None
        refs.append(CheckpointRef(uri=uri, name=name, step=_int(marker, "step"), tag=_str(marker, "tag"),
                                  world_size=_int(marker, "world_size"), marker=marker, files=files))
    return refs


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


def latest_verified_checkpoint(run: str, *, verify_hashes: bool = False) -> CheckpointRef | None:
    """The committed checkpoint of the run at `run` with the highest step (the later folder on a tie)
    that verify_checkpoint accepts, or None. Checkpoints that fail are logged and skipped."""
    candidates = [ref for ref in list_checkpoints(run) if ref.step is not None]
    for ref in sorted(candidates, key=lambda r: (r.step, r.name), reverse=True):
        try:
            verify_checkpoint(ref, verify_hashes=verify_hashes)
            return ref
        except CheckpointError as e:
            log.warning("skipping checkpoint %s (step %s): %s", ref.uri, ref.step, e)
    return None


def verify_checkpoint(ref: CheckpointRef, *, verify_hashes: bool = False,
                      only: Callable[[str], bool] | None = None) -> TrainState:
    """training.checkpointing.read_state for a checkpoint in storage, checked against its listing:
    COMMITTED is there and parses, train_state.json and every rank's file list match the sha256 it
    names, and every listed file is present with its listed size. Only the marker, the state and the
    lists are read; `verify_hashes` also streams every listed file through sha256 (reads it all).
    `only` narrows the file check to the listed files it selects, as in read_state.

    The same checks as read_state, in the same order, with the same messages; read_state needs a
    local folder, this needs only `ref.files` and small reads, which S3 serves without downloads.
    """
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

    deepspeed_files = 0
    for rank in range(world_size):
        list_name = f"{FILES_DIR}/rank-{rank}.json"
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


# --- using a checkpoint -----------------------------------------------------------------------


def download_checkpoint(uri: str, local_dir: Path, *, only: Callable[[str], bool] | None = None) -> Path:
    """The checkpoint folder at `uri` as a local folder.

    A local checkpoint is returned in place (its absolute path; nothing is copied, whatever `only`
    says: the caller reads what it needs). From S3, every file, or only those whose relative POSIX
    path (e.g. "files/rank-0.json") `only` accepts, is downloaded into `local_dir` (created;
    use a fresh one), each written under a temporary name and renamed, replacing what is there.
    Nothing is verified: call training.checkpointing.read_state (with the same `only`) on the result.
    """
    if not storage.is_s3(uri):
        path = Path(storage.local_path(uri)).resolve()
        if not path.is_dir():
            raise StorageError(f"no checkpoint folder at {path}")
        return path
    store = storage.storage_for(uri)
    objects = store.list(uri)
    if not objects:
        raise StorageError(f"no checkpoint at {uri}: nothing is stored under it")
    wanted = [o for o in objects if only is None or only(o.name)]
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        for _ in pool.map(lambda o: _download(store, o, local_dir), wanted):
            pass
    return local_dir


def _download(store: storage.Storage, obj: storage.ObjectInfo, local_dir: Path) -> None:
    rel = PurePosixPath(obj.name)
    if rel.is_absolute() or ".." in rel.parts:
        raise StorageError(f"refusing to download {obj.uri}: its name leaves the checkpoint folder")
    target = local_dir.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.download-{secrets.token_hex(4)}")
    try:
        with store.open_read(obj.uri) as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(8 << 20), b""):
                dst.write(block)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """The URI (local path or s3://...) of a Ray checkpoint on the filesystem ray_storage gave Ray:
    the inverse of as_checkpoint."""
    if checkpoint.filesystem is None or checkpoint.filesystem.type_name == "local":
        return str(checkpoint.path)
    return "s3://" + str(checkpoint.path).lstrip("/")


def as_checkpoint(ref: CheckpointRef | str) -> ray.train.Checkpoint:
    """A ``ray.train.Checkpoint`` for a checkpoint folder in storage (a CheckpointRef or its URI),
    on the same filesystem Ray would use, for a driver to hand to its workers."""
    from ray.train import Checkpoint

    path, filesystem = ray_storage(ref.uri if isinstance(ref, CheckpointRef) else ref)
    return Checkpoint(path, filesystem=filesystem)
