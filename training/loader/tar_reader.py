"""Reading WebDataset tar shards through the storage layer, from any byte offset.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from data_prep import storage
from training.errors import DataError

log = logging.getLogger(__name__)


def open_shards(urls: list[str]) -> Iterator[dict]:
    """WebDataset's shard-opening stage, through the storage layer: local files or streamed S3 objects."""
    for url in urls:
        with storage.storage_for(url).open_read(url) as stream:
            yield {"url": url, "stream": stream}


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset's convention: key is the path up to the first '.' of the basename, the rest the extension."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    if not directory and base.startswith("__") and base.endswith("__"):
        return None  # WebDataset's metadata members
    return (f"{directory}/{stem}" if directory else stem), ext


class _ForwardReader:
    """tell() and forward seek() over a non-seekable stream (an S3 body): seeking reads and discards."""

    def __init__(self, f: BinaryIO, position: int):
        self._f, self._pos = f, position

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self._pos:
            raise io.UnsupportedOperation(f"cannot seek back from byte {self._pos} to {pos} in a streamed shard")
        while self._pos < pos:
            if not self.read(min(pos - self._pos, 1 << 20)):
                break
        return self._pos

    def close(self) -> None:
        self._f.close()


class ShardReader:
    """Samples of one tar shard in order, from sample `seek[0]` at byte `seek[1]` (stepping over
    samples up to `first` by their headers). Handles pax and GNU long names (tarfile parses headers)."""

    def __init__(self, uri: str, *, seek: tuple[int, int], first: int):
        self.uri = uri
        self.index, start = seek
        f = storage.storage_for(uri).open_read(uri, start=start)
        self._file: Any = f if f.seekable() else _ForwardReader(f, start)
        try:
            # TarFile starts at the file's position (tell()), so member offsets are bytes in the shard.
            self._tar = tarfile.TarFile(fileobj=self._file, mode="r")
        except tarfile.TarError as e:
            self._file.close()
            raise DataError(f"{uri} is not a tar from byte {start} ({e}); check it with `ldmflow shard verify`") from e
        self._pending: tuple[tarfile.TarInfo, str, str] | None = None
        while self.index < first:
            self.read(with_data=False)

    def _next_member(self) -> tuple[tarfile.TarInfo, str, str] | None:
        while True:
            try:
                member = self._tar.next()
            except tarfile.TarError as e:
                raise DataError(f"{self.uri} is not a valid tar ({e}); check it with `ldmflow shard verify`") from e
            if member is None:
                return None
            self._tar.members.clear()  # a stream keeps no index of the members it passed
            if not member.isreg():
                continue
            named = split_member_name(member.name)
            if named is not None:
                return member, named[0], named[1]

    def read(self, *, with_data: bool = True) -> tuple[str, dict[str, bytes], int, int | None]:
        """(key, {extension: bytes}, byte where the sample starts, byte where the next one starts or None
        at the end); with with_data=False the members' bytes are skipped (a seek locally) and the dict's
        values are empty."""
        key: str | None = None
        members: dict[str, bytes] = {}
        start = 0
        while True:
            if self._pending is None:
                self._pending = self._next_member()
                if self._pending is None:
                    if key is None:
                        raise DataError(f"{self.uri} ends before sample {self.index}, fewer than its manifest lists; "
                                        "check it with `ldmflow shard verify`")
                    self.index += 1
                    return key, members, start, None
            member, member_key, ext = self._pending
            if key is not None and (member_key != key or ext in members):
                self.index += 1
                return key, members, start, member.offset  # offset: its first header (pax/GNU ones included)
            if key is None:
                start = member.offset
            key = member_key
            # The file stands at this member's data until the next header is read.
            members[ext] = self._file.read(member.size) if with_data else b""
            if with_data and len(members[ext]) != member.size:
                raise DataError(f"{self.uri} is truncated inside {member.name}; check it with `ldmflow shard verify`")
            self._pending = None

    def close(self) -> None:
        self._file.close()
