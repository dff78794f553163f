"""What a dataset already holds, by content: one sorted digest file per part, searched where it lies.

    OUTPUT/part-00000-<run>/digests.bin    sorted, distinct raw sha256 of the part's source bytes
                                           (32 bytes each, no header); written beside samples.jsonl.gz

An incremental run must know, for every item it reads, whether the dataset already has those bytes.
Sending the set of known digests to every worker process and Ray task would pickle it into each
task payload: ~1.5 GB per task at 10M samples, most of it Python object overhead. `KnownDigests`
instead carries only the digest files' URIs and sizes (a few hundred bytes, whatever the dataset's
size); a worker maps each file once (local output: mmap of the file itself, shared through the page
cache; S3: downloaded once per machine into a temp cache keyed by the part, then mapped) and finds a
digest by binary search over the fixed-width records: log2(N) reads of 32 bytes, no false answers.

Why not a Bloom filter: it still needs an exact check behind every "maybe", and at a 1% error rate it
is 1.2 bytes per sample that would again travel in every payload; the sorted file answers exactly
and costs 32 bytes per sample on disk, not in memory. Why not a range read per lookup straight from
S3: log2(N) round trips per item, far slower than one download per machine.

Parts written before this file existed have only samples.jsonl.gz; `digest_files` builds their
digest file from it once (the next run finds it). The file is derived data: not listed in the
manifest (whose canonical bytes older readers re-hash), rebuilt if its size does not fit the part.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import mmap
import os
import tempfile
from dataclasses import dataclass

from data_prep import storage
from data_prep.dataset import DIGESTS_NAME, Part, read_samples

log = logging.getLogger(__name__)

DIGEST_BYTES = 32


def digest_bytes(sha256_hexes: list[str]) -> bytes:
    """The digest file's content for these source sha256s: sorted, distinct, raw."""
    return b"".join(sorted({bytes.fromhex(h) for h in sha256_hexes}))


def write_digests(part_uri: str, sha256_hexes: list[str]) -> int:
    """Write the part's digest file; returns the number of distinct digests in it."""
    data = digest_bytes(sha256_hexes)
    uri = storage.join(part_uri, DIGESTS_NAME)
    storage.storage_for(uri).put_bytes(uri, data)
    return len(data) // DIGEST_BYTES


@dataclass(frozen=True)
class DigestFile:
    uri: str
    count: int


@dataclass(frozen=True)
class KnownDigests:
    """The source sha256s of a dataset's parts, by reference: what a task carries instead of a set."""

    files: tuple[DigestFile, ...] = ()

    def __contains__(self, sha256_hex: str) -> bool:
        digest = bytes.fromhex(sha256_hex)
        return any(_contains(_open(f), digest) for f in self.files if f.count)


def digest_files(parts: list[Part]) -> KnownDigests:
    """The digest file of each part, building it from samples.jsonl.gz for parts written before it."""
    files = []
    for part in parts:
        uri = storage.join(part.uri, DIGESTS_NAME)
        store = storage.storage_for(uri)
        size = store.size(uri) if store.exists(uri) else -1
        # Distinct digests: at most one per sample (fewer when dedup is off and bytes repeat).
        if size < 0 or size % DIGEST_BYTES or size > DIGEST_BYTES * part.manifest.total_samples:
            if size >= 0:
                log.warning("%s does not fit its part (%d bytes); rebuilding it from %s", uri, size,
                            part.manifest.samples_file)
            count = write_digests(part.uri, [r.sha256 for r in read_samples(part.uri, part.manifest)])
            log.info("built %s from %s (%d digests)", uri, part.manifest.samples_file or "nothing", count)
        else:
            count = size // DIGEST_BYTES
        files.append(DigestFile(uri=uri, count=count))
    return KnownDigests(tuple(files))


class _Records:
    """A mapped digest file as a sequence of 32-byte records, for bisect."""

    def __init__(self, buf: mmap.mmap | bytes, count: int):
        self.buf, self.count = buf, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> bytes:
        return self.buf[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]


_opened: dict[str, _Records] = {}
"""This process's mapped digest files, by URI: a part's file never changes once written."""


def _contains(records: _Records, digest: bytes) -> bool:
    i = bisect.bisect_left(records, digest)
    return i < len(records) and records[i] == digest


def _open(f: DigestFile) -> _Records:
    records = _opened.get(f.uri)
    if records is None:
        path = storage.local_path(f.uri) if not storage.is_s3(f.uri) else _cached_copy(f)
        with open(path, "rb") as fh:
            records = _Records(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), f.count)
        _opened[f.uri] = records
    return records


def _cached_copy(f: DigestFile) -> str:
    """A local copy of an S3 digest file, downloaded once per machine (processes and Ray tasks on it
    share it; a part's file never changes, so its URI names the content)."""
    folder = os.path.join(tempfile.gettempdir(), "ldmflow-digests")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, hashlib.sha256(f.uri.encode("utf-8")).hexdigest()[:32] + ".bin")
    if os.path.exists(path) and os.path.getsize(path) == f.count * DIGEST_BYTES:
        return path
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, storage.storage_for(f.uri).open_read(f.uri) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no file or the whole file
    except BaseException:
        os.unlink(tmp)
        raise
    return path
