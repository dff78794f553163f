"""Where Ray Train keeps a run, on a local (shared) path or under ``s3://bucket/prefix``, and how the
driver finds, verifies and fetches the checkpoints in it without Ray.

Ray Train 2.60 (v2) writes a run named ``name`` under the storage path as::

    <storage>/<name>/.validate_storage_marker           empty; written when a trainer starts
    <storage>/<name>/checkpoint_manager_snapshot.json   Ray's list of registered checkpoints
    <storage>/<name>/checkpoint_<%Y-%m-%d_%H-%M-%S.%f>/  one per ray.train.report(checkpoint=...):
                                                        every rank's folder copied into it

The checkpoint folders hold training.checkpoint.layout's layout (COMMITTED, files/rank-N.json, ...).
A new trainer with the same name and storage, even after the earlier one finished, reads the
snapshot and hands its latest registered checkpoint to the workers (``ray.train.get_checkpoint()``;
tested in tests/training/checkpoint/test_run_storage.py). The readers here ignore the snapshot and trust a
checkpoint only by its own COMMITTED marker and file lists, so a checkpoint Ray never registered
(a rank's upload never finished) or half deleted (``num_to_keep``) is judged by what is there.

S3 goes two ways: Ray gets a ``pyarrow.fs.S3FileSystem`` (its upload client); everything read here
goes through ``data_prep.storage`` (boto3), like every other URI the project touches. Both take the
endpoint, credentials and region from the standard AWS environment (AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or a profile,
AWS_REGION / AWS_DEFAULT_REGION).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from data_prep import storage
from data_prep.storage import StorageError
from training.checkpoint.layout import UNIVERSAL_DIR
from training.checkpoint.verify import CheckpointRef

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.train




log = logging.getLogger(__name__)


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
    """`s3://bucket//a//b/` -> "bucket/a/b": the form pyarrow's S3FileSystem (and so Ray) takes; it
    refuses empty path segments, so the driver collapses them in the storage root it hands out."""
    bucket, key = storage._split_s3(storage.collapse_slashes(uri))
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


def download_checkpoint(uri: str, local_dir: Path, *, only: Callable[[str], bool] | None = None) -> Path:
    """The checkpoint folder at `uri` as a local folder.

    A local checkpoint is returned in place (its absolute path; nothing is copied, whatever `only`
    says: the caller reads what it needs). From S3, every file (but a stored universal conversion,
    training.checkpoint.universal_store, which only an elastic resume reads), or only those whose relative POSIX
    path (e.g. "files/rank-0.json") `only` accepts, is downloaded into `local_dir` (created;
    use a fresh one), each written under a temporary name and renamed, replacing what is there.
    Nothing is verified: call training.checkpoint.verify.read_state (with the same `only`) on the result.
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
    wanted = [o for o in objects if (only(o.name) if only is not None else not o.name.startswith(f"{UNIVERSAL_DIR}/"))]
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
    with storage.temporary_file(target) as tmp, store.open_read(obj.uri) as src, open(tmp, "wb") as dst:
        for block in iter(lambda: src.read(8 << 20), b""):
            dst.write(block)


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
