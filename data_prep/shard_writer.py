"""Write samples into WebDataset tar shards that appear only when complete.

Each shard is written under a hidden temporary name in a local staging folder and handed to a
`publish` callback once its last sample is in and its bytes are synced: a rename for a local output,
a completed (multipart) upload for S3. Either way no reader ever sees a partial tar under a real name.
Tar headers carry fixed mtime, owner and mode, so the same samples give byte-identical shards (and the
same sha256 in the manifest) on every machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from data_prep.checks import require_int
from data_prep.errors import DataPrepError
from data_prep.manifest import ShardInfo

_KEY = re.compile(r"[A-Za-z0-9_\-]+")
_EXT = re.compile(r"[A-Za-z0-9_\-.]+")
TAR_MTIME = 946684800
"""mtime of every member: 2000-01-01T00:00:00Z, fixed so rebuilds are byte-identical (not 0, which
some tar tools warn about)."""

_BLOCK = tarfile.BLOCKSIZE  # 512: every header and every member's padded data
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the whole archive to a multiple of this


def shard_name(index: int, sub: int = 0) -> str:
    """Name of the `sub`-th shard written by task `index`: unique per task, stable across runs."""
    return f"shard-{index:06d}-{sub:03d}.tar"


class _HashingFile:
    """Write-only file wrapper that hashes and counts bytes as tarfile writes them (no second read)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file with this project's fixed fields.

    Built directly because tarfile's general header code is a fifth of the per-sample cost of the
    shard stage; a test checks the bytes equal tarfile's own for the same TarInfo.
    """
    encoded = name.encode("ascii")
    header = b"".join([
        encoded.ljust(100, b"\0"),
        b"0000644\0", b"0000000\0", b"0000000\0",  # mode, uid, gid
        b"%011o\0" % size, b"%011o\0" % TAR_MTIME,
        b"        ",  # checksum, counted as spaces
        b"0", b"\0" * 100,  # regular file, no link
        b"ustar\x0000", b"\0" * 64,  # magic + version, empty uname and gname
    ]).ljust(_BLOCK, b"\0")  # devmajor, devminor (empty for regular files) and prefix
    checksum = b"%06o\0" % sum(header)
    return header[:148] + checksum + header[155:]


def tar_size(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members take inside a tar: one header block each plus their data padded to blocks."""
    return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for _, data in members)


def finished_size(content: int) -> int:
    """Size of a closed tar whose members take `content` bytes: two end blocks, padded to a record."""
    return -(-(content + 2 * _BLOCK) // _RECORD) * _RECORD


class ShardWriter:
    """Context manager that spreads samples over tars limited by sample count and by bytes.

    A sample is a mapping with "__key__" (str) and one entry per member: extension -> bytes, e.g.
    {"__key__": "ab12", "jpg": b"...", "txt": b"...", "json": b"..."}. Members are stored as
    `{key}.{ext}` in sorted extension order.

    Shards are named `name_for(n)` for the n-th shard of this writer, written as `.{name}.tmp` in
    `staging_dir`, and handed to `publish(tmp_path, name)` when complete; `publish` must make the shard
    visible under its name (and remove or move the temporary file). The default publish renames within
    `staging_dir`, which is right when the staging folder is the output folder.

    On an exception inside the `with`, the shard in progress is deleted; shards already published stay
    and are listed in `shards` (the caller decides whether to keep them; without a manifest they are
    invisible to readers anyway).
    """

    def __init__(self, staging_dir: str | os.PathLike[str], samples_per_shard: int = 1000, *,
                 max_bytes: int | None = None, name_for: Callable[[int], str] = shard_name,
                 publish: Callable[[Path, str], None] | None = None,
                 on_shard: Callable[[ShardInfo], None] | None = None):
        require_int(samples_per_shard, "samples_per_shard", 1)
        if max_bytes is not None:
            require_int(max_bytes, "max_shard_bytes", _RECORD)
        self.staging_dir = Path(staging_dir)
        self.samples_per_shard = samples_per_shard
        self.max_bytes = max_bytes
        self.name_for = name_for
        self.publish = publish or self._rename_in_place
        self.on_shard = on_shard
        self.shards: list[ShardInfo] = []
        """Completed shards, in write order."""
        self._tmp_path: Path | None = None
        self._file: BinaryIO | None = None
        self._hasher: _HashingFile | None = None
        self._count = 0
        self._content = 0  # bytes of members so far, headers and padding included
        self.last_name = ""
        """Name of the shard the last written sample went into."""

    def __enter__(self) -> ShardWriter:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: Mapping[str, object]) -> None:
        members = _members(sample)
        key = str(sample["__key__"])
        size = tar_size([(f"{key}.{ext}", data) for ext, data in members])
        # Byte limit: start a new shard rather than overflow one, unless this sample alone is too big
        # (then it gets a shard of its own, the only way to keep it).
        if (self._hasher is not None and self.max_bytes is not None
                and finished_size(self._content + size) > self.max_bytes):
            self._finish_current()
        if self._hasher is None:
            self._open_next()
        assert self._hasher is not None
        self.last_name = self.name_for(len(self.shards))
        for ext, data in members:
            self._hasher.write(ustar_header(f"{key}.{ext}", len(data)))
            self._hasher.write(data)
            if len(data) % _BLOCK:
                self._hasher.write(b"\0" * (_BLOCK - len(data) % _BLOCK))
        self._count += 1
        self._content += size
        if self._count >= self.samples_per_shard:
            self._finish_current()

    def close(self) -> None:
        """Finish the shard in progress (if it has any samples)."""
        if self._hasher is not None:
            self._finish_current()

    def _rename_in_place(self, tmp: Path, name: str) -> None:
        os.replace(tmp, self.staging_dir / name)

    def _open_next(self) -> None:
        name = self.name_for(len(self.shards))
        self._tmp_path = self.staging_dir / f".{name}.tmp"
        self._file = open(self._tmp_path, "wb")
        # USTAR: keys are short ASCII, so no PAX headers (which could carry varying fields) are needed.
        self._hasher = _HashingFile(self._file)
        self._count = 0
        self._content = 0

    def _finish_current(self) -> None:
        assert self._file is not None and self._hasher is not None and self._tmp_path is not None
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
        self._hasher.write(b"\0" * (finished_size(self._content) - self._content))
        self._file.flush()
        # Sync before publishing: the manifest written later promises these bytes are durable.
        os.fsync(self._file.fileno())
        self._file.close()
        name = self.name_for(len(self.shards))
        info = ShardInfo(name=name, samples=self._count, bytes=self._hasher.size,
                         sha256=self._hasher.digest.hexdigest())
        tmp = self._tmp_path
        self._file = self._hasher = self._tmp_path = None
        self._count = 0
        try:
            self.publish(tmp, name)
        finally:
            tmp.unlink(missing_ok=True)
        self.shards.append(info)
        if self.on_shard is not None:
            self.on_shard(info)

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
        self._file = self._hasher = self._tmp_path = None
        self._count = 0


def _members(sample: Mapping[str, object]) -> list[tuple[str, bytes]]:
    key = sample.get("__key__")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        # Dots would split the sample in WebDataset readers; slashes would make directories.
        raise DataPrepError(f"sample key must be a non-empty string of letters, digits, '_' or '-', got {key!r}")
    members = sorted((ext, data) for ext, data in sample.items() if ext != "__key__")
    if not members:
        raise DataPrepError(f"sample {key} has no members; expected e.g. jpg, txt and json bytes")
    for ext, data in members:
        if not _EXT.fullmatch(ext) or ext.startswith("."):
            raise DataPrepError(f"sample {key}: member extension must look like 'jpg' or 'latent.npy', got {ext!r}")
        if len(f"{key}.{ext}") > 100:
            raise DataPrepError(f"sample {key}.{ext}: member names are limited to 100 characters (USTAR tar)")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DataPrepError(f"sample {key}.{ext}: value must be bytes, got {type(data).__name__}")
    return [(ext, bytes(data)) for ext, data in members]  # type: ignore[arg-type]
