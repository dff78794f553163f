"""Write samples into WebDataset tar shards that appear only when complete.

Each shard is written under a hidden temporary name and renamed to `shard-NNNNNN.tar` once its last
sample is in and its bytes are synced, so no reader ever sees a partial tar under a real name. Tar
headers carry fixed mtime, owner and mode, so the same samples give byte-identical shards (and the
same sha256 in the manifest) on every machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from data_prep.errors import DataPrepError
from data_prep.manifest import ShardInfo

SHARD_PATTERN = "shard-*.tar"
"""Glob matching the shards this writer produces."""

_KEY = re.compile(r"[A-Za-z0-9_\-]+")
_EXT = re.compile(r"[A-Za-z0-9_\-.]+")
TAR_MTIME = 946684800
"""mtime of every member: 2000-01-01T00:00:00Z, fixed so rebuilds are byte-identical (not 0, which
some tar tools warn about)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


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


class ShardWriter:
    """Context manager that spreads samples over tars of at most `samples_per_shard` samples each.

    A sample is a mapping with "__key__" (str) and one entry per member: extension -> bytes, e.g.
    {"__key__": "ab12", "jpg": b"...", "txt": b"...", "json": b"..."}. Members are stored as
    `{key}.{ext}` in sorted extension order.

    On an exception inside the `with`, the shard in progress is deleted; shards already completed stay
    and are listed in `shards` (the caller decides whether to keep them; without a manifest they are
    invisible to readers anyway).
    """

    def __init__(self, output_dir: str | os.PathLike[str], samples_per_shard: int = 1000, *,
                 on_shard: Callable[[ShardInfo], None] | None = None):
        if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise DataPrepError(f"samples_per_shard must be an integer >= 1, got {samples_per_shard!r}")
        self.output_dir = Path(output_dir)
        self.samples_per_shard = samples_per_shard
        self.on_shard = on_shard
        self.shards: list[ShardInfo] = []
        """Completed shards, in write order."""
        self._tmp_path: Path | None = None
        self._file: BinaryIO | None = None
        self._hasher: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def __enter__(self) -> ShardWriter:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: Mapping[str, object]) -> None:
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
        if self._tar is None:
            self._open_next()
        assert self._tar is not None
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(bytes(data)))
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish_current()

    def close(self) -> None:
        """Finish the shard in progress (if it has any samples)."""
        if self._tar is not None:
            self._finish_current()

    def _open_next(self) -> None:
        name = shard_name(len(self.shards))
        self._tmp_path = self.output_dir / f".{name}.tmp"
        self._file = open(self._tmp_path, "wb")
        self._hasher = _HashingFile(self._file)
        # USTAR: keys are short ASCII, so no PAX headers (which could carry varying fields) are needed.
        self._tar = tarfile.TarFile(
            fileobj=self._hasher, mode="w", format=tarfile.USTAR_FORMAT  # type: ignore[arg-type]
        )
        self._count = 0

    def _finish_current(self) -> None:
        assert self._tar is not None and self._file is not None and self._hasher is not None
        assert self._tmp_path is not None
        self._tar.close()  # writes the end-of-archive blocks through the hasher
        self._file.flush()
        # Sync before rename: the manifest written later promises these bytes are on disk.
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(len(self.shards))
        os.replace(self._tmp_path, self.output_dir / name)
        info = ShardInfo(name=name, samples=self._count, bytes=self._hasher.size,
                         sha256=self._hasher.digest.hexdigest())
        self.shards.append(info)
        self._tar = self._file = self._hasher = self._tmp_path = None
        self._count = 0
        if self.on_shard is not None:
            self.on_shard(info)

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
        self._tar = self._file = self._hasher = self._tmp_path = None
        self._count = 0
