"""One storage layer for every URI the project reads or writes: local paths and `s3://bucket/prefix`.

`s3://...` always goes to S3 through boto3; anything else is a local path (`file://` URIs included).
An `s3://` string never reaches pathlib or `open()`, where it would silently become a local directory
named `s3:`. Other schemes (`gs://`, `http://`) are refused rather than treated as local paths.

Writes are published atomically: a local file is copied to a hidden temporary name in the target
directory, synced and renamed; an S3 object becomes visible only when its PUT (or multipart upload)
completes. Readers therefore never see a partial object under a real name.

S3 configuration is standard AWS: credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or
AWS_PROFILE, the endpoint of an S3-compatible server from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (or
`S3Storage(endpoint_url=...)`), region from AWS_DEFAULT_REGION / the profile, else us-east-1.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import secrets
import shutil
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from data_prep.checks import require_int, require_number
from data_prep.errors import DataPrepError

log = logging.getLogger(__name__)

MiB = 1024 * 1024

_S3_MIN_PART = 5 * MiB
"""S3 refuses multipart parts smaller than this (all but the last)."""
_COPY_CHUNK = 8 * MiB
_DELETE_BATCH = 1000
"""Most keys one DeleteObjects request may name."""
_PROBE_PREFIX = ".ldmflow-write-probe-"
_TMP_NAME = re.compile(r"\..+\.tmp-[0-9a-f]{16}")
"""Hidden names LocalStorage.put_file writes before renaming; `list` skips these in-progress files."""
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")


class StorageError(DataPrepError):
    """A storage URI cannot be read or written; the message names the URI and the fix."""


class NoSuchObjectError(StorageError, FileNotFoundError):
    """The object or file a read asked for does not exist (also a FileNotFoundError for callers that catch
    that)."""


# --------------------------------------------------------------------------------------------- URIs


WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
"""Settings a remote worker needs to reach the same S3 as the driver. Credentials are not among them:
cluster nodes bring their own (instance roles, mounted profiles) rather than receive copies."""


def env_for_workers() -> dict[str, str]:
    """The WORKER_ENV variables set here, to hand to processes on other machines (Ray tasks, workers)."""
    return {k: os.environ[k] for k in WORKER_ENV if k in os.environ}


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for `s3://bucket/...` URIs, which must go through S3Storage."""
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


def _check_scheme(uri: str) -> None:
    if uri[:4].lower() == "s3:/":
        raise StorageError(
            f"{uri!r} is an S3 URI with a slash lost (pathlib turns 's3://b/k' into 's3:/b/k'); keep S3 URIs as str"
        )
    m = _SCHEME.match(uri)
    if m and m.group(1).lower() not in ("s3", "file"):
        raise StorageError(f"unsupported storage URI {uri!r}: use s3://bucket/prefix or a local path (or file://)")


def local_path(uri: str | os.PathLike[str]) -> str:
    """The filesystem path of a local URI (a plain path or `file://...`); StorageError for `s3://`."""
    uri = os.fspath(uri)
    if is_s3(uri):
        raise StorageError(f"{uri} is an S3 URI, but only a local path works here")
    _check_scheme(uri)
    if uri[:7].lower() == "file://":
        path = uri[7:]
        if path.startswith("localhost/"):
            path = path[len("localhost"):]
        if not path.startswith("/"):
            raise StorageError(f"file URI {uri!r} must be absolute, e.g. file:///data/shards; or pass a plain path")
        return urllib.parse.unquote(path)
    if not uri:
        raise StorageError("empty storage path; pass a local directory or s3://bucket/prefix")
    return uri


def _split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a//b` -> ("bucket", "a//b"): the key exactly as written, as S3, boto3 and the AWS CLI
    take it. S3 keys are names, not paths: "a//b", "/a" and "a/b" are three objects, and a listing
    returns each as it is, so collapsing slashes here would make a listed object unreadable."""
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise StorageError(f"S3 URI {uri!r} names no bucket; write it as s3://bucket/prefix")
    return bucket, key


def collapse_slashes(uri: str | os.PathLike[str]) -> str:
    """`s3://b//a//b/` -> `s3://b/a/b/`; anything else as it is. For a root that is also reached through
    pyarrow (Ray Train's storage), which refuses empty path segments where S3 keeps them (see _split_s3)."""
    uri = os.fspath(uri)
    return uri[:5] + re.sub(r"/{2,}", "/", uri[5:]) if is_s3(uri) else uri


def _dir_key(key: str) -> str:
    """The key prefix of everything "inside" `key`: "p" and "p/" -> "p/"; "" (whole bucket) stays ""."""
    key = key.rstrip("/")
    return f"{key}/" if key else ""


def absolute(uri: str | os.PathLike[str]) -> str:
    """`uri` with a local path made absolute and resolved (what another process, task or node is
    handed); an s3:// URI as it is."""
    uri = os.fspath(uri)
    return uri if is_s3(uri) else os.path.realpath(local_path(uri))


def join(base: str | os.PathLike[str], *names: str) -> str:
    """Append path components to a URI: join("s3://b/p", "x", "y.tar") == "s3://b/p/x/y.tar".

    Slashes around `names` are stripped (a leading "/" does not restart the path as with os.path.join).
    Local paths (and file:// URIs) keep their form, repeated slashes collapsed. S3 keys stay exact
    (see _split_s3): only the slashes where the parts meet are tidied, so a listed key such as "a//b"
    is addressed by its ObjectInfo.uri, never re-joined from its name.
    """
    base = os.fspath(base)
    parts = [n.strip("/") for n in names if n.strip("/")]
    if is_s3(base):
        return "/".join([base.rstrip("/"), *parts]) if parts else base
    if base[:7].lower() == "file://":
        scheme, rest = base[:7], base[7:]
    else:
        scheme, rest = "", base
    if parts:
        rest = os.path.join(rest, *parts) if not scheme else "/".join([rest.rstrip("/"), *parts])
    return scheme + re.sub(r"/{2,}", "/", rest)


def basename(uri: str | os.PathLike[str]) -> str:
    """The last component of a URI or path: basename("s3://b/p/x.tar") == "x.tar" (trailing "/" ignored)."""
    uri = os.fspath(uri)
    if is_s3(uri):
        return uri[5:].rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(local_path(uri).rstrip("/"))


# ---------------------------------------------------------------------------------------- interface


@dataclass(frozen=True)
class ObjectInfo:
    """One file or object found by Storage.list."""

    uri: str
    """Full URI of the object, usable with the same Storage."""
    name: str
    """Path relative to the listed prefix, with forward slashes, e.g. "train/shard-000000.tar"."""
    size: int
    """Size in bytes."""


class Storage(ABC):
    """Files under local paths or objects under S3 prefixes, behind one interface.

    A prefix has directory semantics: listing "s3://b/p" lists keys under "p/", never "p2/...".
    """

    @abstractmethod
    def list(self, prefix: str, *, recursive: bool = True) -> list[ObjectInfo]:
        """Files under `prefix` sorted by name ([] if none); `recursive=False` keeps only direct children."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether a file/object (not a directory or prefix) exists at `uri`."""

    @abstractmethod
    def size(self, uri: str) -> int:
        """Size in bytes; NoSuchObjectError if missing."""

    @abstractmethod
    def open_read(self, uri: str, start: int = 0) -> BinaryIO:
        """A streaming binary reader (close it, or use `with`) from byte `start` on (a seek for files, a
        ranged GET for S3); NoSuchObjectError if missing."""

    def read_bytes(self, uri: str) -> bytes:
        """The whole object; NoSuchObjectError if missing."""
        with self.open_read(uri) as f:
            return f.read()

    @abstractmethod
    def put_file(self, local_path: str, uri: str) -> None:
        """Publish a finished local file at `uri` atomically (replacing what is there)."""

    @abstractmethod
    def put_bytes(self, uri: str, data: bytes) -> None:
        """Publish `data` at `uri` atomically (replacing what is there)."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Delete one file/object; a missing one is fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under `prefix`; returns how many files/objects were deleted."""

    @abstractmethod
    def check_readable(self, uri: str) -> None:
        """Raise StorageError before any work if `uri` (a file/object or a prefix) cannot be read."""

    @abstractmethod
    def check_writable(self, uri: str) -> None:
        """Raise StorageError before any work if files cannot be written under the prefix `uri`."""


# -------------------------------------------------------------------------------------------- local


class LocalStorage(Storage):
    """Local filesystem; accepts plain paths and file:// URIs."""

    def list(self, prefix: str, *, recursive: bool = True, follow_links: bool = False) -> list[ObjectInfo]:
        """As Storage.list; `follow_links` also descends into symlinked folders (each real folder
        once, so a link cycle ends), which are otherwise left out (see linked_folders)."""
        root = local_path(prefix)
        if not os.path.isdir(root):
            return []
        found: list[tuple[str, int]] = []
        visited: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
            real = os.path.realpath(dirpath)
            if not recursive or real in visited:
                dirnames.clear()
                if real in visited:
                    continue
            visited.add(real)
            for fname in filenames:
                if _TMP_NAME.fullmatch(fname):
                    continue
                full = os.path.join(dirpath, fname)
                try:
                    size = os.stat(full).st_size
                except FileNotFoundError:  # deleted while we walked
                    continue
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), size))
        return [ObjectInfo(uri=join(prefix, name), name=name, size=size) for name, size in sorted(found)]

    def linked_folders(self, prefix: str) -> list[str]:
        """Symlinked folders under `prefix` (relative POSIX paths) that `list` does not descend into."""
        root = local_path(prefix)
        links = []
        for dirpath, dirnames, _ in os.walk(root):
            for name in dirnames:
                if os.path.islink(os.path.join(dirpath, name)):
                    links.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
        return sorted(links)

    def exists(self, uri: str) -> bool:
        return os.path.isfile(local_path(uri))

    def size(self, uri: str) -> int:
        path = local_path(uri)
        try:
            return os.stat(path).st_size
        except OSError as e:
            raise _local_error(e, uri, "stat") from e

    def open_read(self, uri: str, start: int = 0) -> BinaryIO:
        path = local_path(uri)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise _local_error(e, uri, "read") from e
        if start:
            f.seek(start)
        return f

    def put_file(self, local_path: str, uri: str) -> None:
        _check_source(local_path, uri)
        with _open_source(local_path, uri) as src:
            self._publish(uri, lambda dst: shutil.copyfileobj(src, dst, _COPY_CHUNK))

    def put_bytes(self, uri: str, data: bytes) -> None:
        self._publish(uri, lambda dst: dst.write(data))

    def _publish(self, uri: str, write: Callable[[BinaryIO], object]) -> None:
        """Write through `write(file)` to a hidden temp name next to the target, fsync, rename, fsync dir."""
        try:
            with temporary_file(uri, durable=True) as tmp, open(tmp, "wb") as dst:
                write(dst)
        except OSError as e:
            raise _local_error(e, uri, "write") from e

    def delete(self, uri: str) -> None:
        path = local_path(uri)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if os.path.isdir(path):
                raise StorageError(f"cannot delete {uri}: it is a directory; use delete_prefix") from e
            raise _local_error(e, uri, "delete") from e

    def delete_prefix(self, prefix: str) -> int:
        root = local_path(prefix)
        if os.path.dirname(os.path.abspath(root)) == os.path.abspath(root):
            raise StorageError(f"refusing to delete everything under the filesystem root {root}; name a directory")
        if not os.path.isdir(root):
            return 0
        count = sum(len(files) for _, _, files in os.walk(root))
        try:
            shutil.rmtree(root)
        except OSError as e:
            raise _local_error(e, prefix, "delete") from e
        return count

    def check_readable(self, uri: str) -> None:
        path = local_path(uri)
        if not os.path.exists(path):
            raise StorageError(
                f"local path {path} does not exist (relative paths start at {os.getcwd()}); fix the path or create it"
            )
        mode = os.R_OK | (os.X_OK if os.path.isdir(path) else 0)
        if not os.access(path, mode):
            raise StorageError(f"local path {path} is not readable by this user; fix its permissions")

    def check_writable(self, uri: str) -> None:
        path = local_path(uri)
        if os.path.exists(path) and not os.path.isdir(path):
            raise StorageError(f"output path {path} is an existing file, not a directory; choose a directory path")
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f"{_PROBE_PREFIX}{secrets.token_hex(8)}")
            with open(probe, "wb") as f:
                f.write(b"probe")
            os.unlink(probe)
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise StorageError(
                f"cannot write to local directory {path} ({reason}); fix its permissions or choose another output path"
            ) from e


def _check_source(src: str, uri: str) -> None:
    if not os.path.isfile(src):
        raise StorageError(f"cannot upload {src} to {uri}: {src} is not an existing local file")


def _open_source(src: str, uri: str) -> BinaryIO:
    try:
        return open(src, "rb")
    except OSError as e:
        raise StorageError(f"cannot upload {src} to {uri}: cannot read {src} ({e.strerror})") from e


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems/platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _local_error(e: OSError, uri: str, action: str) -> StorageError:
    if isinstance(e, FileNotFoundError) and action in ("read", "stat"):
        return NoSuchObjectError(f"no such file {uri}; check the path (relative paths start at {os.getcwd()})")
    if isinstance(e, IsADirectoryError) and action in ("read", "stat", "write"):
        return StorageError(f"cannot {action} {uri}: it is a directory; name a file inside it")
    if isinstance(e, PermissionError):
        return StorageError(f"cannot {action} {uri}: permission denied; fix its permissions or use another path")
    return StorageError(f"cannot {action} {uri}: {e.strerror or e}")


# ----------------------------------------------------------------------------------------------- S3

_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[tuple[Any, ...], Any] = {}
"""boto3 clients by (pid, endpoint, settings). Clients are thread-safe but must not cross a fork: the
pid in the key makes a forked child build its own (its connection pool would share the parent's sockets)."""


def reset_clients() -> None:
    """Forget cached S3 clients, so the next S3 call reads credentials and endpoint from the environment
    again (tests that change AWS_* variables call this)."""
    with _CLIENT_LOCK:
        _CLIENTS.clear()


def _after_fork_in_child() -> None:
    # The lock may have been held by another thread at fork time; the child gets a fresh one.
    global _CLIENT_LOCK
    _CLIENT_LOCK = threading.Lock()
    _CLIENTS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _env_endpoint() -> str | None:
    """The S3 endpoint boto3 itself would take from the environment (service-specific first)."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@dataclass(frozen=True)
class S3Storage(Storage):
    """S3 or an S3-compatible server through boto3. Holds settings only (picklable); the boto3 client is
    built on first use and cached per process."""

    endpoint_url: str | None = None
    """Endpoint of an S3-compatible server, e.g. "http://127.0.0.1:8333"; None reads AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL, and with neither set uses AWS S3. With an endpoint, path-style addressing is used."""
    multipart_threshold: int = 64 * MiB
    """Uploads at least this large go as multipart uploads (S3 shows the object only once all parts land)."""
    multipart_chunksize: int = 64 * MiB
    """Part size of multipart uploads (S3 minimum 5 MiB; at most 10,000 parts per object)."""
    max_attempts: int = 5
    """Attempts per request, retries included (botocore "standard" retry mode with backoff)."""
    connect_timeout: float = 10.0
    """Seconds to wait for a TCP connection to the endpoint."""
    read_timeout: float = 60.0
    """Seconds to wait for bytes on an open connection."""

    def __post_init__(self) -> None:
        for attr in ("multipart_threshold", "multipart_chunksize"):
            require_int(getattr(self, attr), f"S3Storage `{attr}`", _S3_MIN_PART, note=" (5 MiB)", error=StorageError)
        require_int(self.max_attempts, "S3Storage `max_attempts`", 1, error=StorageError)
        for attr in ("connect_timeout", "read_timeout"):
            require_number(getattr(self, attr), f"S3Storage `{attr}`", inclusive=False, note=" (seconds)",
                           error=StorageError)

    # -- client

    def client(self) -> Any:
        """The boto3 S3 client for this process (built on first use, rebuilt after fork or reset_clients)."""
        endpoint = self.endpoint_url or _env_endpoint()
        key = (os.getpid(), endpoint, self.max_attempts, self.connect_timeout, self.read_timeout)
        with _CLIENT_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                try:
                    client = _CLIENTS[key] = self._make_client(endpoint)
                except ValueError as e:  # botocore: "Invalid endpoint: ..."
                    raise StorageError(
                        f"invalid S3 endpoint URL {endpoint!r} ({e}); set AWS_ENDPOINT_URL (or endpoint_url) to "
                        "e.g. http://127.0.0.1:8333, or unset it for AWS S3"
                    ) from e
            return client

    def _make_client(self, endpoint: str | None) -> Any:
        import boto3  # deferred: importing boto3 costs ~0.3 s, and local-only runs never need it
        from botocore.config import Config

        session = boto3.session.Session()  # one per client: Session objects are not thread-safe
        checksums: dict[str, str] = {}
        if "request_checksum_calculation" in Config.OPTION_DEFAULTS:  # botocore >= 1.36; older never adds them
            # boto3 >= 1.36 adds CRC32 checksum headers to every upload and validates response checksums by
            # default; S3-compatible servers (older MinIO, Ceph, many vendors) reject or mangle them
            # (https://github.com/boto/boto3/issues/4392). "when_required" restores the pre-1.36 behaviour;
            # s3transfer then adds no checksums to multipart parts either (boto/s3transfer#327).
            checksums = {"request_checksum_calculation": "when_required",
                         "response_checksum_validation": "when_required"}
        config = Config(
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            **checksums,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            # Virtual-hosted addressing (bucket.host) needs DNS for every bucket; servers on 127.0.0.1 cannot
            # have that, so custom endpoints get path-style URLs (host/bucket/key).
            s3={"addressing_style": "path"} if endpoint else None,
        )
        return session.client("s3", endpoint_url=endpoint, region_name=session.region_name or "us-east-1",
                               config=config)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=4,  # parts in flight; upload_fileobj buffers each one in memory
            # Never the CRT client (chosen automatically when awscrt is installed): it ignores the checksum
            # settings above and has its own retry behaviour.
            preferred_transfer_client="classic",
        )

    # -- reads

    def list(self, prefix: str, *, recursive: bool = True) -> list[ObjectInfo]:
        bucket, key = _split_s3(prefix)
        dir_key = _dir_key(key)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": dir_key}
        if not recursive:
            kwargs["Delimiter"] = "/"
        found: list[ObjectInfo] = []
        try:
            for page in self.client().get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(dir_key):]
                    if not name or name.endswith("/"):  # directory markers some tools and servers create
                        continue
                    found.append(ObjectInfo(uri=f"s3://{bucket}/{obj['Key']}", name=name, size=int(obj["Size"])))
        except Exception as e:
            raise self._error(e, prefix, "list") from e
        return sorted(found, key=lambda o: o.name)

    def exists(self, uri: str) -> bool:
        bucket, key = _split_s3(uri)
        if not key:
            return False
        try:
            self.client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            err = self._error(e, uri, "look up")
            if isinstance(err, NoSuchObjectError):
                return False
            raise err from e

    def size(self, uri: str) -> int:
        bucket, key = _split_s3(uri)
        try:
            return int(self.client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as e:
            raise self._error(e, uri, "stat") from e

    def open_read(self, uri: str, start: int = 0) -> BinaryIO:
        def get(position: int) -> dict:
            bucket, key = _split_s3(uri)
            ranged = {"Range": f"bytes={position}-"} if position else {}
            try:
                return self.client().get_object(Bucket=bucket, Key=key, **ranged)
            except Exception as e:
                raise self._error(e, uri, "read") from e

        first = get(start)
        reader = _BodyReader(first["Body"], reopen=lambda position: get(position)["Body"], position=start,
                             end=start + int(first.get("ContentLength", 0)), attempts=self.max_attempts)
        return cast(BinaryIO, io.BufferedReader(reader, buffer_size=1 * MiB))

    # -- writes

    def put_file(self, local_path: str, uri: str) -> None:
        _check_source(local_path, uri)
        bucket, key = self._object_key(uri)
        try:
            self.client().upload_file(local_path, bucket, key, Config=self._transfer_config())
        except Exception as e:
            raise self._error(e, uri, "upload") from e

    def put_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._object_key(uri)
        try:
            self.client().upload_fileobj(io.BytesIO(data), bucket, key, Config=self._transfer_config())
        except Exception as e:
            raise self._error(e, uri, "upload") from e

    def delete(self, uri: str) -> None:
        bucket, key = self._object_key(uri)
        try:
            self.client().delete_object(Bucket=bucket, Key=key)  # S3 answers 204 for missing keys too
        except Exception as e:
            raise self._error(e, uri, "delete") from e

    def delete_prefix(self, prefix: str) -> int:
        bucket, key = _split_s3(prefix)
        if not key.strip("/"):
            raise StorageError(f"refusing to delete every object in bucket {bucket} ({prefix}); name a prefix")
        client = self.client()
        deleted = 0
        try:
            # Each page holds at most 1000 keys, the DeleteObjects limit. Deleting keys already listed does
            # not disturb the continuation token, which points past them.
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_dir_key(key)):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                for start in range(0, len(keys), _DELETE_BATCH):
                    batch = keys[start:start + _DELETE_BATCH]
                    resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                    if resp.get("Errors"):
                        err = resp["Errors"][0]
                        raise StorageError(
                            f"cannot delete s3://{bucket}/{err.get('Key')} under {prefix}: {err.get('Code')} "
                            f"{err.get('Message', '')} ({len(resp['Errors'])} keys failed); check the bucket policy"
                        )
                    deleted += len(batch)
        except StorageError:
            raise
        except Exception as e:
            raise self._error(e, prefix, "delete") from e
        return deleted

    # -- preflight checks

    def check_readable(self, uri: str) -> None:
        bucket, key = _split_s3(uri)
        self._check_bucket(bucket, uri)
        if not key:
            return
        client = self.client()
        try:
            if client.list_objects_v2(Bucket=bucket, Prefix=_dir_key(key), MaxKeys=1).get("KeyCount", 0):
                return
            if not key.endswith("/"):
                client.head_object(Bucket=bucket, Key=key)
                return
        except Exception as e:
            err = self._error(e, uri, "read")
            if not isinstance(err, NoSuchObjectError):
                raise err from e
        raise StorageError(f"nothing at {uri} (no object and no keys under it) at {self.endpoint}; fix the URI")

    def check_writable(self, uri: str) -> None:
        bucket, key = _split_s3(uri)
        self._check_bucket(bucket, uri)
        probe = _dir_key(key) + f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
        client = self.client()
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"probe")
            client.delete_object(Bucket=bucket, Key=probe)
        except Exception as e:
            raise self._error(e, uri, "write a probe object under") from e

    def _check_bucket(self, bucket: str, uri: str) -> None:
        client = self.client()
        try:
            client.head_bucket(Bucket=bucket)
            return
        except Exception as e:
            if _status(e) != 403:
                raise self._error(e, uri, "reach the bucket of") from e
        # A HEAD response has no body, so a 403 cannot say whether the credentials are wrong or merely not
        # allowed: ask again with a GET, whose error body carries the code (InvalidAccessKeyId, ...).
        try:
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        except Exception as e:
            raise self._error(e, uri, "reach the bucket of") from e

    # -- errors

    @property
    def endpoint(self) -> str:
        """The endpoint URL requests go to (AWS S3's regional endpoint when none is configured)."""
        return str(self.client().meta.endpoint_url)

    def _object_key(self, uri: str) -> tuple[str, str]:
        bucket, key = _split_s3(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"S3 URI {uri} names no object key; write it as s3://{bucket}/path/to/object")
        return bucket, key

    def _error(self, e: BaseException, uri: str, action: str) -> StorageError:
        """The one place botocore/boto3 exceptions become StorageErrors that name the URI and the fix."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(e, StorageError):
            return e
        if isinstance(e, S3UploadFailedError):
            # upload_file re-raises ClientError as a message string; the structured error is its context.
            inner = e.__cause__ or e.__context__
            if isinstance(inner, Exception):
                e = inner
        where = self.endpoint
        bucket = _split_s3(uri)[0]
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"cannot {action} {uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "or AWS_PROFILE"
            )
        if isinstance(e, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
            return StorageError(
                f"cannot {action} {uri}: S3 endpoint {where} is unreachable ({e}); start the server or set "
                "AWS_ENDPOINT_URL to the right endpoint"
            )
        if not isinstance(e, ClientError):
            return StorageError(f"cannot {action} {uri} at {where}: {type(e).__name__}: {e}")
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = _status(e)
        if code in ("NoSuchBucket",) or (action == "reach the bucket of" and status == 404):
            return StorageError(f"bucket {bucket} does not exist at {where}; create it or fix the URI ({uri})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed"):
            return StorageError(
                f"S3 refused the credentials ({code}) for {uri} at {where}; check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return StorageError(
                f"S3 denied access ({code or status}): cannot {action} {uri} at {where}; the credentials are valid "
                f"but lack permission on bucket {bucket}: grant it or use other credentials"
            )
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return NoSuchObjectError(f"no such object {uri} at {where}")
        if code in ("PermanentRedirect", "301") or status == 301:
            return StorageError(
                f"bucket {bucket} is in another region than {where}; set AWS_DEFAULT_REGION to the bucket's region"
            )
        return StorageError(f"cannot {action} {uri} at {where}: S3 error {code or status}: {error.get('Message', e)}")


_bytes_read = [0]
_bytes_read_lock = threading.Lock()


def s3_bytes_read() -> int:
    """Bytes this process has read from S3 object bodies so far, over every thread: a restore logs
    the difference per rank ("rank 1 read 12.3 MB from storage"), and tests bound it."""
    with _bytes_read_lock:
        return _bytes_read[0]


class _BodyReader(io.RawIOBase):
    """A GetObject body (botocore StreamingBody) as a raw stream: bytes come off the socket only as the
    caller reads them, and a body shorter than its Content-Length raises IncompleteReadError.

    Wrapping is needed because StreamingBody.__enter__ returns its urllib3 response, so `with body as f`
    would bypass that length check.

    A connection reset, a read timeout or a cut-off body mid-stream is not the end: botocore retries
    a request, not a body being read, so this reopens the object at the byte it had reached (a ranged
    GET through `reopen`) after a back-off, up to `attempts` times in a row without progress.
    """

    def __init__(self, body: Any, *, reopen: Callable[[int], Any] | None = None, position: int = 0,
                 end: int | None = None, attempts: int = 3, backoff: float = 0.5):
        self._body = body
        self._reopen, self._position, self._end = reopen, position, end
        self._attempts, self._backoff = attempts, backoff

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        chunks = []
        while chunk := self._read(_COPY_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def _read(self, n: int) -> bytes:
        failures = 0
        while True:
            try:
                data = self._body.read(n)
            except _mid_stream_errors() as e:
                failures += 1
                if self._end is not None and self._position >= self._end:
                    return b""  # broke off after the last byte: nothing is missing
                if self._reopen is None or failures >= self._attempts:
                    raise
                time.sleep(self._backoff * 2 ** (failures - 1))
                with contextlib.suppress(Exception):
                    self._body.close()
                self._body = self._reopen(self._position)
                log.warning("S3 read broke off at byte %d (%s); reopened there", self._position, e)
                continue
            self._position += len(data)
            with _bytes_read_lock:
                _bytes_read[0] += len(data)
            return data

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


@functools.cache
def _mid_stream_errors() -> tuple[type[BaseException], ...]:
    """What a body being read raises when its connection breaks (imported on first use)."""
    import urllib3.exceptions
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    return (IncompleteReadError, ReadTimeoutError, ResponseStreamingError, urllib3.exceptions.ProtocolError,
            urllib3.exceptions.ReadTimeoutError, ConnectionError, TimeoutError)


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


# ------------------------------------------------------------------------------------------ factory

_LOCAL = LocalStorage()
_S3 = S3Storage()


def storage_for(uri: str | os.PathLike[str]) -> Storage:
    """The Storage for a URI: S3Storage (endpoint and credentials from the environment) for s3://, else
    LocalStorage. Cheap to call per URI: S3 clients are cached per process."""
    uri = os.fspath(uri)
    if is_s3(uri):
        _split_s3(uri)
        return _S3
    local_path(uri)  # refuses unknown schemes
    return _LOCAL


# ------------------------------------------------------------------------------ atomic publication


def put_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Publish `data` at `uri` (a local path or s3://) atomically, replacing what is there: the one
    way the project writes a whole small file (markers, JSON, PNGs)."""
    uri = os.fspath(uri)
    storage_for(uri).put_bytes(uri, data)


@contextlib.contextmanager
def temporary_file(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[str]:
    """A hidden temporary name beside the local file `path`, for a writer that wants a path (torch.save,
    safetensors): when the block ends without an error it is renamed to `path`, replacing what is
    there; otherwise it is removed. So `path` is never seen half written, and `list` never shows the
    temporary. `durable` also syncs the file and the rename to disk (what put_bytes does)."""
    path = local_path(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{secrets.token_hex(8)}")
    os.makedirs(parent, exist_ok=True)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(parent)  # make the rename itself durable


@contextlib.contextmanager
def temporary_dir(path: str | os.PathLike[str], *, replace: bool = True) -> Iterator[str]:
    """A hidden temporary folder beside the local folder `path`, renamed to `path` when the block ends
    without an error (removed otherwise): a half-written folder never sits at `path`. An existing
    `path` is replaced, or with `replace=False` kept (another process published it first: the
    temporary one is dropped)."""
    path = local_path(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{secrets.token_hex(8)}")
    os.makedirs(tmp)
    try:
        yield tmp
        if replace and os.path.isdir(path):
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not os.path.isdir(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # published by another process meanwhile: theirs stays
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
