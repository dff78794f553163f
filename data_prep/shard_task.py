"""One shard task: read a chunk of source items, process each, write and publish its own shards.

This is what runs in a worker process or a Ray task. A task owns a fixed slice of the input (a run
of items, or one existing tar), so its shard names (`shard-<task>-<n>.tar`) never collide with another
task's, and the output is the same whatever the number of processes. Everything here is a function of
(task, context): no globals, no shared state, so process pools and Ray run it alike.

Per item: read bytes once (local, S3 or HTTP; remote reads overlap on a few threads) -> their sha256,
the item's identity: bytes the dataset already holds are counted as existing, not decoded ->
caption (sidecar, table or tar member; cleaned) -> exact de-duplication within the run ->
image_ops.process_image -> ShardWriter under key_for(source id, sha256). Every problem with an item
becomes a counted Skip with its own reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from data_prep import storage
from data_prep.dataset import SampleRecord
from data_prep.http_fetch import FetchFailure, FetchOptions, fetch, read_pool
from data_prep.image_ops import ImageSkip, ProcessOptions, process_image
from data_prep.known import KnownDigests
from data_prep.manifest import ShardInfo
from data_prep.shard_writer import ShardWriter, shard_name
from data_prep.sources import (
    OVERSIZED,
    SHARD_IMAGE_EXTS,
    ItemRef,
    Skip,
    iter_shard_samples,
    key_for,
    read_sidecar_caption,
)

PROGRESS_EVERY = 16
"""Items between progress calls: in a process pool each call takes a lock shared with the other workers."""

SKIP_EXAMPLES_PER_REASON = 5
"""Skips per reason a task reports in detail; the rest are only counted."""

_REMOTE_PREFIXES = ("http://", "https://", "s3://")
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Task:
    """A slice of the input: a run of items, or one existing shard to re-process."""

    index: int
    """Task number: its shards are named shard-<index>-<n>.tar."""
    items: tuple[ItemRef, ...] = ()
    shard_uri: str | None = None
    shard_id: str = ""
    """Stable name of `shard_uri` relative to the source, used in the source ids of its samples."""

    @property
    def size(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class TaskContext:
    """Everything a task needs besides its slice; sent to each worker once."""

    part_uri: str
    """Where this run's shards go (a local folder or an s3:// prefix)."""
    process: ProcessOptions
    fetch: FetchOptions
    samples_per_shard: int
    max_shard_bytes: int | None
    caption_field: str = "caption"
    keep_empty_captions: bool = False
    dedup: bool = True
    known: KnownDigests = KnownDigests()
    """Source sha256s of the dataset's earlier parts, by reference to their digest files (known.py):
    the context's size does not grow with the dataset."""
    read_threads: int = 16
    """Concurrent remote reads (HTTP, S3) per task; local files are read inline."""


@dataclass
class TaskResult:
    index: int
    shards: list[ShardInfo] = field(default_factory=list)
    records: list[SampleRecord] = field(default_factory=list)
    """Written samples in write order."""
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[Skip] = field(default_factory=list)
    """The first few skips of each reason, for the log."""
    items: int = 0
    """Items handled, those the dataset already holds not included."""
    existing: int = 0
    """Items whose bytes the dataset already holds (read and hashed, not decoded or written)."""
    bytes_read: int = 0

    def skip(self, item: Skip) -> None:
        self.skipped[item.reason] += 1
        if self.skipped[item.reason] <= SKIP_EXAMPLES_PER_REASON:
            self.examples.append(item)


_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """NFC-normalised, control characters dropped, whitespace runs (newlines too) made single spaces."""
    text = unicodedata.normalize("NFC", text)
    if not text.isprintable():  # rare: only then walk the characters
        text = "".join(ch if ch.isprintable() or ch.isspace() else " " for ch in text)
    return _WHITESPACE.sub(" ", text).strip()


@dataclass
class _Loaded:
    """One item after reading: its bytes and caption, or the reason it is skipped."""

    source_id: str
    data: bytes | None = None
    caption: str | None = None
    skip: Skip | None = None
    sha256: str | None = None
    """Of `data`, hashed once, where it was read (on a reader thread for remote items)."""
    known: bool = False
    """The dataset already holds these bytes: nothing else about the item is read or decoded."""

    def identify(self, known: KnownDigests) -> None:
        assert self.data is not None
        if self.sha256 is None:
            self.sha256 = hashlib.sha256(self.data).hexdigest()
            self.known = self.sha256 in known


def run_task(task: Task, ctx: TaskContext, progress: Callable[[int], None] | None = None) -> TaskResult:
    """Process one task; its shards are published under ctx.part_uri as they complete."""
    result = TaskResult(index=task.index)
    seen: set[str] = set()  # sha256s written by this task
    keys: set[str] = set()
    unreported = 0  # items handled since the last progress call
    with staging(ctx.part_uri) as (folder, publish):
        writer = ShardWriter(folder, ctx.samples_per_shard, max_bytes=ctx.max_shard_bytes,
                             name_for=lambda n: shard_name(task.index, n), publish=publish)
        with writer:
            for loaded in _load(task, ctx):
                made = _sample(loaded, ctx, seen, keys, result)
                if made is not None:
                    sample, sha = made
                    writer.write(sample)
                    result.records.append(SampleRecord(key=sample["__key__"], sha256=sha,
                                                       source_id=loaded.source_id, shard=writer.last_name,
                                                       caption=loaded.caption or ""))
                unreported += 1
                if progress is not None and unreported >= PROGRESS_EVERY:
                    progress(unreported)
                    unreported = 0
        if progress is not None and unreported:
            progress(unreported)
    result.shards = list(writer.shards)
    return result


def _sample(loaded: _Loaded, ctx: TaskContext, seen: set[str], keys: set[str],
            result: TaskResult) -> tuple[dict, str] | None:
    """The shard sample for a loaded item and its source sha256, or None after counting it as a skip or
    as already in the dataset."""
    if loaded.skip is not None:
        result.items += 1
        result.skip(loaded.skip)
        return None
    assert loaded.data is not None
    result.bytes_read += len(loaded.data)
    # The bytes were read once and are hashed once; known content is not decoded.
    loaded.identify(ctx.known)
    sha = loaded.sha256
    assert sha is not None
    if loaded.known:
        result.existing += 1
        return None
    result.items += 1
    assert loaded.caption is not None
    caption = clean_caption(loaded.caption)
    if not caption and not ctx.keep_empty_captions:
        result.skip(Skip(loaded.source_id, "empty_caption", "caption is empty after clean-up"))
        return None
    if ctx.dedup and sha in seen:
        result.skip(Skip(loaded.source_id, "duplicate", f"same bytes (sha256 {sha[:12]}) as an item in this run"))
        return None
    key = key_for(loaded.source_id, sha)
    if key in keys:  # dedup off: the same item listed twice (readers group a tar's members by key)
        result.skip(Skip(loaded.source_id, "duplicate_key", "the same source id and bytes as an earlier item"))
        return None
    try:
        processed = process_image(loaded.data, ctx.process)
    except ImageSkip as e:
        result.skip(Skip(loaded.source_id, e.reason, e.detail))
        return None
    seen.add(sha)
    keys.add(key)
    loaded.caption = caption
    meta = {"source_id": loaded.source_id, "sha256": sha, **processed.metadata()}
    return {
        "__key__": key,
        ctx.process.image_format: processed.data,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }, sha


# --- reading ---------------------------------------------------------------------------------------


def _load(task: Task, ctx: TaskContext) -> Iterator[_Loaded]:
    if task.shard_uri is not None:
        yield from _load_shard(task, ctx)
        return
    remote = any(ref.image.startswith(_REMOTE_PREFIXES) for ref in task.items)
    if not remote or ctx.read_threads <= 1:
        for ref in task.items:
            yield _load_item(ref, ctx)
        return
    # Remote reads are latency-bound: keep a window of them in flight, yield in input order. The
    # pool and its connections are the process's, reused by its next task.
    pool = read_pool(ctx.read_threads)
    window: list[Future[_Loaded]] = []
    try:
        items = iter(task.items)
        for ref in items:
            window.append(pool.submit(_load_item, ref, ctx))
            if len(window) >= 2 * ctx.read_threads:
                break
        for ref in items:
            yield window.pop(0).result()
            window.append(pool.submit(_load_item, ref, ctx))
        while window:
            yield window.pop(0).result()
    finally:
        for future in window:  # stopped early: nothing of this task runs on into the next one
            future.cancel()
        wait(window)


def _load_item(ref: ItemRef, ctx: TaskContext) -> _Loaded:
    """Read the image first: bytes the dataset already holds need no caption read."""
    loaded = _Loaded(source_id=ref.source_id)
    data = _read_image(ref.image, ctx)
    if isinstance(data, Skip):
        loaded.skip = Skip(ref.source_id, data.reason, _without_query(data.detail, ref))
        return loaded
    loaded.data = data
    loaded.identify(ctx.known)
    if loaded.known or ref.caption is not None:
        loaded.caption = ref.caption
        return loaded
    assert ref.caption_uri is not None
    try:
        raw = storage.storage_for(ref.caption_uri).read_bytes(ref.caption_uri)
        loaded.caption = read_sidecar_caption(raw, ref.caption_uri, ctx.caption_field)
    except UnicodeDecodeError as e:
        loaded.skip = Skip(ref.source_id, "caption_not_utf8", f"{storage.basename(ref.caption_uri)}: {e}")
    except (KeyError, ValueError) as e:
        loaded.skip = Skip(ref.source_id, "missing_caption",
                           f"{storage.basename(ref.caption_uri)} has no usable `{ctx.caption_field}` ({e})")
    except (OSError, storage.StorageError) as e:
        loaded.skip = Skip(ref.source_id, "unreadable_file", f"caption: {e}")
    return loaded


def _without_query(detail: str, ref: ItemRef) -> str:
    """A fetch error's detail without the URL's query string where the source id drops it (errors
    quote the URL or its path; a signature must not reach the log and the run report either)."""
    if ref.image == ref.source_id or not ref.image.startswith(("http://", "https://")):
        return detail
    query = urlsplit(ref.image).query
    return detail.replace(query, "...") if query else detail


def _read_image(uri: str, ctx: TaskContext) -> bytes | Skip:
    if uri.startswith(("http://", "https://")):
        got = fetch(uri, ctx.fetch)
        if isinstance(got, FetchFailure):
            return Skip(uri, got.reason, got.detail)
        return got
    cap = ctx.process.max_bytes
    try:
        with storage.storage_for(uri).open_read(uri) as f:
            data = read_capped(f, cap)
    except (OSError, storage.StorageError) as e:
        return Skip(uri, "unreadable_file", str(e))
    if data is None:
        return Skip(uri, "too_large", f"more than max_image_bytes={cap}")
    return data


def read_capped(f, cap: int) -> bytes | None:
    """All of `f`, or None as soon as it proves longer than `cap` bytes (never reading much past it).

    A local file's size is known up front; a stream is read in chunks. Not `f.read(cap + 1)`: CPython
    allocates the whole cap first, which at the 64 MiB default costs more than reading a typical image.
    """
    try:
        size = os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        size = None
    if size is not None:
        return f.read() if size <= cap else None
    chunks, total = [], 0
    while chunk := f.read(min(_CHUNK, cap + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            return None
    return b"".join(chunks)


def _load_shard(task: Task, ctx: TaskContext) -> Iterator[_Loaded]:
    assert task.shard_uri is not None
    for sample in iter_shard_samples(task.shard_uri, max_member_bytes=ctx.process.max_bytes):
        key = str(sample["__key__"])
        source_id = f"{task.shard_id}/{key}"
        loaded = _Loaded(source_id=source_id)
        ext = next((e for e in SHARD_IMAGE_EXTS if e in sample), None)
        if OVERSIZED in sample:
            cap = ctx.process.max_bytes
            loaded.skip = Skip(source_id, "too_large", f"{sample[OVERSIZED]}: over max_image_bytes={cap}")
        elif ext is None:
            loaded.skip = Skip(source_id, "missing_image", f"sample has no {'/'.join(SHARD_IMAGE_EXTS)} member")
        else:
            loaded.data = bytes(sample[ext])  # type: ignore[arg-type]
            try:
                if "txt" in sample:
                    loaded.caption = bytes(sample["txt"]).decode("utf-8")  # type: ignore[arg-type]
                elif "json" in sample:
                    loaded.caption = read_sidecar_caption(bytes(sample["json"]), ".json",  # type: ignore[arg-type]
                                                          ctx.caption_field)
                else:
                    loaded.skip = Skip(source_id, "missing_caption", "sample has no txt or json member")
            except UnicodeDecodeError as e:
                loaded.skip = Skip(source_id, "caption_not_utf8", str(e))
            except (KeyError, ValueError) as e:
                loaded.skip = Skip(source_id, "missing_caption", f"json member has no `{ctx.caption_field}` ({e})")
        yield loaded


# --- publishing --------------------------------------------------------------------------------------


@contextmanager
def staging(part_uri: str) -> Iterator[tuple[Path, Callable[[Path, str], None]]]:
    """Where a ShardWriter builds shards for `part_uri`, and how it publishes them.

    Local output: the part folder itself, published by rename (no copy). S3: a local temp folder,
    published by upload (S3 shows an object only once its multipart upload completes), removed after.
    """
    if not storage.is_s3(part_uri):
        local = Path(storage.local_path(part_uri))
        local.mkdir(parents=True, exist_ok=True)

        def rename(tmp: Path, name: str) -> None:
            tmp.replace(local / name)

        yield local, rename
        return
    store = storage.storage_for(part_uri)

    def upload(tmp: Path, name: str) -> None:
        store.put_file(str(tmp), storage.join(part_uri, name))

    temp = Path(tempfile.mkdtemp(prefix="ldmflow-shard-"))
    try:
        yield temp, upload
    finally:
        shutil.rmtree(temp, ignore_errors=True)
