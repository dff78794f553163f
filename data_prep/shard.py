"""The shard stage: a source (folder, table, URLs, shards; local or S3) -> a new part of a dataset.

    plan_source ─▶ tasks ─▶ run_task × N (processes or Ray Data): bytes the dataset has are counted, not kept
        │ Skip                             │ shards published as they complete
        ▼                                  ▼
    counted by reason ◀── cross-task duplicates removed ◀── results
                                        │
            samples file, digest file ─▶ part manifest ─▶ index.json (last: the part becomes visible)

What the dataset has is decided by content (sha256 of the source bytes, looked up in the parts' digest
files, known.py), never by name: a folder whose files are named like earlier ones, or an image
replaced in place, adds its new images; a re-signed URL to the same bytes adds nothing.

A run never rewrites a published name: each run writes a new part folder with a unique name, so a
reader streaming the dataset is never handed different bytes under a name it already knows. With
`overwrite`, the new index lists only the new part, and the old parts are deleted after it is published.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from data_prep import storage
from data_prep.checks import require_bool, require_choice, require_int
from data_prep.dataset import (
    INDEX_NAME,
    PART_PREFIX,
    Part,
    SampleRecord,
    content_sum,
    read_dataset,
    read_index,
    write_index,
    write_samples,
)
from data_prep.errors import DataPrepError
from data_prep.http_fetch import FetchOptions, close_read_pool
from data_prep.image_ops import IMAGE_FORMATS, RESIZE_MODES, ProcessOptions
from data_prep.known import KnownDigests, digest_files, write_digests
from data_prep.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, ShardInfo, write_manifest
from data_prep.shard_task import SKIP_EXAMPLES_PER_REASON, Task, TaskContext, TaskResult, run_task, staging
from data_prep.shard_writer import ShardWriter
from data_prep.sources import Skip, SourceOptions, SourcePlan, iter_shard_samples, plan_source

log = logging.getLogger(__name__)

EXECUTORS = ("processes", "ray")
MIN_TASK_ITEMS = 16
"""Smallest task the guided schedule cuts (see task_slices): below it, per-task costs would show."""


@dataclass
class ShardConfig:
    """Settings of one `ldmflow shard` run. The processing options are stored in the manifest and
    index, and are part of the dataset's content id; where and how fast it ran are not."""

    source: str
    """Image folder with .txt/.json captions, a .csv/.tsv/.jsonl/.parquet table of paths or URLs with
    captions, or existing WebDataset shards; a local path or s3://bucket/prefix."""
    output: str
    """Dataset folder or s3:// prefix: index.json plus one part folder per run (created if missing)."""
    resolution: int = 64
    """Side in pixels of the stored images (center_crop and pad); the target for aspect buckets."""
    resize_mode: str = "center_crop"
    """center_crop (shorter side to `resolution`, centre crop), pad (longer side, padded square), or none."""
    image_format: str = "jpg"
    """Image encoding inside the shards: jpg, png or webp."""
    quality: int = 95
    """JPEG/WebP quality, 1-100 (ignored for png)."""
    jpeg_subsampling: str = "4:4:4"
    """JPEG chroma subsampling: 4:4:4 (full colour resolution) or 4:2:0 (smaller, faster; what web images use)."""
    min_size: int = 0
    """Skip images whose shorter side is below this many pixels (0: keep all)."""
    max_pixels: int = 89_478_485
    """Skip images whose header claims more pixels than this, before decoding (decompression bombs)."""
    max_image_bytes: int = 64 * 2**20
    """Skip source files (or downloads) larger than this many bytes."""
    samples_per_shard: int = 1000
    """Maximum samples per tar; aim for shards of 100 MB-1 GB so readers stream efficiently."""
    max_shard_bytes: int | None = 1 << 30
    """Maximum bytes per tar (a single larger sample still gets a shard of its own); None: no limit."""
    keep_empty_captions: bool = False
    """Keep items whose caption is empty after clean-up (unconditional training data) instead of skipping."""
    follow_symlinks: bool = False
    """Read symlinked folders of a local folder source (otherwise each is a counted `symlinked_folder` skip)."""
    allow_private_hosts: bool = False
    """Fetch table URLs from loopback, private and link-local hosts (see FetchOptions.allow_private_hosts)."""
    allowed_roots: tuple[str, ...] = ()
    """More folders or s3:// prefixes a table's paths may point into (see SourceOptions.allowed_roots)."""
    dedup: bool = True
    """Skip items whose source bytes equal an earlier item's in this run. (Bytes an earlier part holds
    are never added again, whatever this says: they are that part's items.)"""
    keep_url_query: bool = False
    """Keep URL query strings (signatures) in source ids, sample .json and samples.jsonl.gz (see
    SourceOptions.keep_url_query); off, a re-signed URL is the same item."""
    source_format: str = "auto"
    """auto, folder, table or shards (see sources.py)."""
    url_column: str | None = None
    """Table column with the image path or URL (default: url, image, path, ...)."""
    caption_column: str | None = None
    """Table column with the caption (default: caption, text, prompt)."""
    caption_field: str = "caption"
    """Field holding the caption in .json sidecars and in the json member of existing shards."""
    processes: int = 0
    """Worker processes on this machine; 0: one per CPU core."""
    executor: str = "processes"
    """processes (this machine) or ray (Ray Data tasks on the cluster at `ray_address`)."""
    ray_address: str | None = None
    """Ray cluster address for executor=ray ("auto", "ray://host:10001", host:port, or "local")."""
    fetch_timeout: float = 10.0
    """Seconds per HTTP attempt (connect and read)."""
    fetch_retries: int = 2
    """Extra attempts for a URL after connection errors, timeouts, HTTP 429 and 5xx."""
    read_threads: int = 16
    """Concurrent remote reads (HTTP, S3) per task."""
    overwrite: bool = False
    """Replace the dataset in `output` with this run's items alone; without it a run adds a new part."""
    progress: bool = True
    """Show a progress bar with samples/s on a terminal (log lines elsewhere)."""

    def __post_init__(self) -> None:
        self.source = os.fspath(self.source)
        self.output = os.fspath(self.output)
        self.image_format = str(self.image_format).lower()
        require_int(self.resolution, "shard config `resolution`", 8, 8192)
        require_int(self.samples_per_shard, "shard config `samples_per_shard`", 1)
        require_int(self.processes, "shard config `processes`", 0, 1024)
        require_int(self.read_threads, "shard config `read_threads`", 1, 256)
        if self.max_shard_bytes is not None:
            require_int(self.max_shard_bytes, "shard config `max_shard_bytes`", 1 << 20)
        require_choice(self.image_format, "shard config `image_format`", IMAGE_FORMATS)
        require_choice(self.resize_mode, "shard config `resize_mode`", RESIZE_MODES)
        require_choice(self.executor, "shard config `executor`", EXECUTORS)
        self.allowed_roots = tuple(os.fspath(r) for r in self.allowed_roots)
        for name in ("overwrite", "keep_empty_captions", "follow_symlinks", "allow_private_hosts", "dedup",
                     "keep_url_query", "progress"):
            require_bool(getattr(self, name), f"shard config `{name}`")
        if self.executor == "ray" and not self.ray_address:
            raise DataPrepError("shard config `executor: ray` needs `ray_address` (e.g. auto, or host:6379)")
        # Built here so their own checks (quality range, fetch timeouts, ...) fail before any work.
        self.process_options()
        self.fetch_options()
        self.source_options()

    def process_options(self) -> ProcessOptions:
        return ProcessOptions(resolution=self.resolution, resize_mode=self.resize_mode,
                              image_format=self.image_format, quality=self.quality,
                              jpeg_subsampling=self.jpeg_subsampling, min_size=self.min_size,
                              max_pixels=self.max_pixels, max_bytes=self.max_image_bytes)

    def fetch_options(self) -> FetchOptions:
        return FetchOptions(timeout=self.fetch_timeout, retries=self.fetch_retries,
                            max_bytes=self.max_image_bytes, threads=self.read_threads,
                            allow_private_hosts=self.allow_private_hosts)

    def source_options(self) -> SourceOptions:
        return SourceOptions(source_format=self.source_format, url_column=self.url_column,
                             caption_column=self.caption_column, caption_field=self.caption_field,
                             keep_empty_captions=self.keep_empty_captions, follow_symlinks=self.follow_symlinks,
                             allowed_roots=self.allowed_roots, keep_url_query=self.keep_url_query)

    def identity_options(self) -> dict[str, Any]:
        """The options that change what the shards hold: part of the dataset's content id."""
        return {"resolution": self.resolution, "resize_mode": self.resize_mode, "image_format": self.image_format,
                "quality": self.quality, "jpeg_subsampling": self.jpeg_subsampling, "min_size": self.min_size,
                "keep_empty_captions": self.keep_empty_captions, "dedup": self.dedup}

    def worker_count(self) -> int:
        return self.processes or os.cpu_count() or 1


@dataclass
class ShardReport:
    """What a run did; the CLI prints it, the flow publishes it as a Prefect artifact."""

    output: str
    part: str | None
    """The part this run added, or None when there was nothing new."""
    items: int
    """Source items considered this run, those already in the dataset not included."""
    written: int
    skipped: dict[str, int]
    existing: int
    """Items whose bytes the dataset already held from earlier runs (read and hashed, not written)."""
    shards: int
    bytes_written: int
    bytes_read: int
    duration_s: float
    dataset_samples: int
    """Samples in the whole dataset after this run, all parts."""
    content_id: str
    manifest_sha256: str | None = None
    examples: list[Skip] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.written / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def nothing_new(self) -> bool:
        return self.part is None

    def rows(self) -> list[tuple[str, str]]:
        rows = [("written", f"{self.written} samples in {self.shards} shards"),
                ("skipped", str(sum(self.skipped.values())))]
        rows += [(f"  {reason}", str(n)) for reason, n in sorted(self.skipped.items())]
        rows += [("already in dataset", str(self.existing)),
                 ("bytes", f"{self.bytes_read / 1e6:.1f} MB read, {self.bytes_written / 1e6:.1f} MB written"),
                 ("duration", f"{self.duration_s:.1f} s ({self.samples_per_s:.0f} samples/s)"),
                 ("dataset", f"{self.dataset_samples} samples, content id {self.content_id[:16]}"),
                 ("part", self.part or "none (nothing new)")]
        return rows

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in self.rows())

    def markdown(self) -> str:
        lines = [f"# Shards: {self.output}", "", "| | |", "|---|---|"]
        lines += [f"| {k.strip()} | {v} |" for k, v in self.rows()]
        if self.examples:
            lines += ["", "## Example skips", "", "| reason | item | detail |", "|---|---|---|"]
            lines += [f"| {s.reason} | `{s.source_id}` | {s.detail.replace('|', '/')[:200]} |" for s in self.examples]
        return "\n".join(lines) + "\n"


def build_shards(config: ShardConfig, *, progress: Callable[[int], None] | None = None) -> ShardReport:
    """Add the source's new items to the dataset at `config.output` as a new part; returns a report.

    Bad items are skipped and counted by reason. Bad input as a whole (missing source, unwritable
    output, unknown bucket, bad credentials, options that differ from the existing dataset's, nothing
    usable) raises DataPrepError before any shard is written. `progress`, if given, is called with the
    number of items handled since its last call.
    """
    try:
        return _build(config, progress)
    finally:
        close_read_pool()  # this process's reader threads and their connections


def _build(config: ShardConfig, progress: Callable[[int], None] | None) -> ShardReport:
    started = time.perf_counter()
    store = storage.storage_for(config.output)
    # Everything that can stop the run is checked before anything is written.
    plan = plan_source(config.source, config.source_options())
    store.check_writable(config.output)
    previous = _previous_parts(config)
    _remove_orphans(config.output, previous)
    # With overwrite the old parts are being replaced, so nothing in them counts as already present.
    known = KnownDigests() if config.overwrite else digest_files(previous)

    skips = list(plan.skips)
    items = _listed_once(plan, skips)
    existing = 0
    if not items and not plan.shards:
        return _nothing_new(config, previous, plan, skips, existing, started)

    part_name = f"{PART_PREFIX}{_next_part_number(previous):05d}-{uuid.uuid4().hex[:8]}"
    part_uri = storage.join(config.output, part_name)
    ctx = TaskContext(part_uri=part_uri, process=config.process_options(), fetch=config.fetch_options(),
                      samples_per_shard=config.samples_per_shard, max_shard_bytes=config.max_shard_bytes,
                      caption_field=config.caption_field, keep_empty_captions=config.keep_empty_captions,
                      dedup=config.dedup, known=known, read_threads=config.read_threads)
    tasks = _tasks(plan, items, config)
    total_items = sum(t.size for t in tasks) if not plan.shards else plan.expected_items
    try:
        results = _run(tasks, ctx, config, total_items, progress)
        records, shards, skipped, examples = _merge(results, ctx, skips)
        existing = sum(r.existing for r in results)
        written = len(records)
        handled = len(plan.skips) + sum(r.items for r in results)
        if written == 0:  # every new item was skipped: no part (and an error if there is no dataset either)
            storage.storage_for(part_uri).delete_prefix(part_uri)
            return _nothing_new(config, previous, plan, skips, existing, started, skipped=skipped,
                                items=handled, examples=examples)
        manifest = _part_manifest(config, part_uri, records, shards, skipped, started, handled=handled,
                                  existing=existing, bytes_read=sum(r.bytes_read for r in results))
        write_manifest(part_uri, manifest)
        parts = ([] if config.overwrite else previous) + [Part(name=part_name, uri=part_uri, manifest=manifest)]
        index = write_index(config.output, parts, config.identity_options())
    except BaseException:
        # Nothing of a failed run may look like data: its part was never indexed, so remove it.
        try:
            storage.storage_for(part_uri).delete_prefix(part_uri)
        except Exception as cleanup_error:  # the original error matters more; the next run retries this
            log.warning("could not remove %s after a failed run: %s", part_uri, cleanup_error)
        raise
    if config.overwrite:
        for old in previous:
            storage.storage_for(old.uri).delete_prefix(old.uri)
            log.info("removed replaced part %s (--overwrite)", old.name)
    report = ShardReport(
        output=config.output, part=part_name, items=handled, written=written,
        skipped=dict(sorted(skipped.items())), existing=existing, shards=len(shards),
        bytes_written=manifest.total_bytes, bytes_read=manifest.stats["bytes_read"],
        duration_s=time.perf_counter() - started, dataset_samples=index["total_samples"],
        content_id=index["content_id"], manifest_sha256=manifest.sha256, examples=examples,
    )
    log.info("dataset %s: part %s with %d samples in %d shards (skipped %s); %d samples in all, content id %s",
             config.output, part_name, written, len(shards), _format_counts(skipped) or "none",
             report.dataset_samples, report.content_id[:12])
    return report


def _part_manifest(config: ShardConfig, part_uri: str, records: list[SampleRecord], shards: list[ShardInfo],
                   skipped: Counter[str], started: float, *, handled: int, existing: int,
                   bytes_read: int) -> Manifest:
    """The new part's manifest, after writing its samples file (which the manifest names and hashes)."""
    samples_name, samples_sha = write_samples(part_uri, records)
    write_digests(part_uri, [r.sha256 for r in records])
    duration = round(time.perf_counter() - started, 3)
    identity = config.identity_options()
    return Manifest(
        schema_version=SCHEMA_VERSION,
        shards=shards,
        total_samples=sum(s.samples for s in shards),
        total_bytes=sum(s.bytes for s in shards),
        skipped=dict(sorted(skipped.items())),
        config={"options": identity, "source": config.source,
                "run": {k: v for k, v in asdict(config).items() if k not in identity}},
        created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        stats={"items": handled, "written": len(records), "existing": existing, "bytes_read": bytes_read,
               "duration_s": duration, "samples_per_s": round(len(records) / max(duration, 1e-9), 1)},
        content_sum=content_sum(r.identity for r in records),
        samples_file=samples_name,
        samples_sha256=samples_sha,
    )


# --- what the dataset already holds -------------------------------------------------------------------


def _previous_parts(config: ShardConfig) -> list[Part]:
    index = read_index(config.output)
    store = storage.storage_for(config.output)
    if index is None:
        if store.exists(storage.join(config.output, MANIFEST_NAME)) and not config.overwrite:
            raise DataPrepError(
                f"{config.output} holds shards with a {MANIFEST_NAME} but no {INDEX_NAME} (an older layout or a "
                "single part); pass --overwrite to replace it or choose another --output"
            )
        return []
    dataset = read_dataset(config.output)
    if dataset.options != config.identity_options() and not config.overwrite:
        changed = sorted(k for k in set(dataset.options) | set(config.identity_options())
                         if dataset.options.get(k) != config.identity_options().get(k))
        was = ", ".join(f"{k}={dataset.options.get(k)!r}" for k in changed)
        raise DataPrepError(
            f"{config.output} was built with different options ({was}); "
            "new items must be processed the same way: use the same options, pass --overwrite, "
            "or choose another --output"
        )
    return dataset.parts


def _remove_orphans(output: str, parts: list[Part]) -> None:
    """Delete part folders no index lists: what a killed run left behind (never visible to readers).

    This assumes one writer per dataset at a time (README): a concurrent run's part in progress is
    unlisted too. A lock would need conditional writes, which not every S3-compatible store has.
    """
    listed = {p.name for p in parts}
    store = storage.storage_for(output)
    orphans = sorted({o.name.split("/", 1)[0] for o in store.list(output)
                      if o.name.startswith(PART_PREFIX) and "/" in o.name} - listed)
    for name in orphans:
        n = store.delete_prefix(storage.join(output, name))
        log.warning("removed %s: %d files of an earlier run that did not finish", name, n)


def _next_part_number(parts: list[Part]) -> int:
    numbers = [int(p.name[len(PART_PREFIX):].split("-")[0]) for p in parts if p.name.startswith(PART_PREFIX)]
    return max(numbers, default=-1) + 1


def _listed_once(plan: SourcePlan, skips: list[Skip]):
    """The plan's items, each image URI once: a table naming the same image twice is a duplicate.
    (Whether the dataset already holds an item is decided by its bytes, in the tasks.)"""
    items = []
    seen: set[str] = set()
    for ref in plan.items:
        if ref.image in seen:
            skips.append(Skip(ref.source_id, "duplicate", "the source lists this item more than once"))
        else:
            seen.add(ref.image)
            items.append(ref)
    return items


def _nothing_new(config: ShardConfig, previous: list[Part], plan: SourcePlan, skips: list[Skip], existing: int,
                 started: float, *, skipped: Counter[str] | None = None, items: int = 0,
                 examples: list[Skip] | None = None) -> ShardReport:
    counts = Counter(s.reason for s in skips) if skipped is None else skipped
    if not previous:
        raise DataPrepError(
            f"no usable images in {config.source} (skipped: {_format_counts(counts) or 'none found'}); "
            "each image needs a non-empty caption and must be decodable"
        )
    dataset_samples = sum(p.manifest.total_samples for p in previous)
    from data_prep.dataset import Dataset

    dataset = Dataset(uri=config.output, parts=previous, options=config.identity_options())
    log.info("nothing new in %s: %d items already in %s, nothing written", config.source, existing, config.output)
    return ShardReport(output=config.output, part=None, items=items or len(plan.skips), written=0,
                       skipped=dict(sorted(counts.items())), existing=existing, shards=0, bytes_written=0, bytes_read=0,
                       duration_s=time.perf_counter() - started, dataset_samples=dataset_samples,
                       content_id=dataset.content_id, examples=examples or _examples(skips))


# --- running the tasks -----------------------------------------------------------------------------


def _tasks(plan: SourcePlan, items: list, config: ShardConfig) -> list[Task]:
    if plan.shards:
        prefix = config.source.rstrip("/") + "/"
        return [Task(index=i, shard_uri=uri, shard_id=uri[len(prefix):] if uri.startswith(prefix) else uri)
                for i, uri in enumerate(plan.shards)]
    return [Task(index=i, items=tuple(items[start:start + size]))
            for i, (start, size) in enumerate(task_slices(len(items), config.samples_per_shard,
                                                          config.worker_count()))]


def task_slices(n: int, samples_per_shard: int, workers: int) -> list[tuple[int, int]]:
    """(start, size) of each task over n items: full shards first, then shrinking tasks.

    Guided scheduling, as in OpenMP: while much work remains, tasks hold samples_per_shard items
    (full shards); towards the end each task takes 1/(2 x workers) of what is left, down to
    MIN_TASK_ITEMS, so no worker sits idle at the end while another finishes a big task. The
    cost is a few small shards at the end of a part, which readers do not mind. Deterministic in
    (n, samples_per_shard, workers), like the shard names that follow from it.
    """
    slices = []
    start = 0
    while start < n:
        remaining = n - start
        size = samples_per_shard
        if workers > 1:
            size = min(size, max(MIN_TASK_ITEMS, math.ceil(remaining / (2 * workers))))
        if remaining - size < MIN_TASK_ITEMS and remaining <= samples_per_shard:
            size = remaining  # no sliver of a task at the very end
        size = min(size, remaining)
        slices.append((start, size))
        start += size
    return slices


def _run(tasks: list[Task], ctx: TaskContext, config: ShardConfig, total: int | None,
         progress: Callable[[int], None] | None) -> list[TaskResult]:
    with _Progress(total, enabled=config.progress, callback=progress) as bar:
        if config.executor == "ray":
            from data_prep.ray_executor import run_tasks_on_ray

            results = run_tasks_on_ray(tasks, ctx, config.ray_address or "auto")
            bar.update(sum(r.items for r in results))
        elif config.worker_count() == 1 or len(tasks) == 1:
            results = [run_task(t, ctx, bar.update) for t in tasks]
        else:
            results = _run_in_processes(tasks, ctx, min(config.worker_count(), len(tasks)), bar)
    return sorted(results, key=lambda r: r.index)


def start_method() -> str:
    """How worker processes start: a plain fork when this process runs a single thread (the CLI),
    which costs nothing; otherwise (inside a Prefect task, beside boto3's transfer threads) a fork
    server that has imported this module once, because a fork copies other threads' held locks
    and can deadlock on them, and spawning would re-import everything in every worker."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


_worker_ctx: TaskContext | None = None
_worker_counter: Any = None


def _init_worker(ctx: TaskContext, counter: Any, environ: dict[str, str]) -> None:
    global _worker_ctx, _worker_counter
    _worker_ctx, _worker_counter = ctx, counter
    # A fork server keeps the environment of the moment it started; workers must see today's
    # (AWS credentials and endpoint above all), as a plain fork or spawn would.
    os.environ.clear()
    os.environ.update(environ)
    storage.reset_clients()


def _count(n: int) -> None:
    with _worker_counter.get_lock():
        _worker_counter.value += n


def _run_in_worker(task: Task) -> TaskResult:
    assert _worker_ctx is not None
    return run_task(task, _worker_ctx, _count)


def _run_in_processes(tasks: list[Task], ctx: TaskContext, processes: int, bar: _Progress) -> list[TaskResult]:
    method = start_method()
    mp = multiprocessing.get_context(method)
    if method == "forkserver":
        mp.set_forkserver_preload(["data_prep.shard"])
    counter = mp.Value("q", 0)
    results: list[TaskResult] = []
    reported = 0
    with mp.Pool(processes, initializer=_init_worker, initargs=(ctx, counter, dict(os.environ))) as pool:
        pending = pool.imap_unordered(_run_in_worker, tasks)
        while len(results) < len(tasks):
            try:
                results.append(pending.next(timeout=0.5))
            except multiprocessing.TimeoutError:
                pass
            done = counter.value
            bar.update(done - reported)
            reported = done
    return results


class _Progress:
    """A tqdm bar with samples/s on a terminal; elsewhere (CI, Prefect workers) a log line every 15 s."""

    def __init__(self, total: int | None, *, enabled: bool, callback: Callable[[int], None] | None):
        self.total, self.callback = total, callback
        self.done = 0
        self.bar = None
        self.started = self.last_log = time.monotonic()
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", unit_scale=True, desc="shard", dynamic_ncols=True)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int) -> None:
        if n <= 0:
            return
        self.done += n
        if self.callback is not None:
            self.callback(n)
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_log >= 15:
            self.last_log = time.monotonic()
            rate = self.done / max(self.last_log - self.started, 1e-9)
            of = f"/{self.total}" if self.total else ""
            log.info("shard: %d%s items, %.0f samples/s", self.done, of, rate)


# --- merging task results --------------------------------------------------------------------------


def _merge(results: list[TaskResult], ctx: TaskContext, planning_skips: list[Skip]):
    """All written samples in input order, with duplicates across tasks removed from their shards."""
    skipped: Counter[str] = Counter(s.reason for s in planning_skips)
    examples = _examples(planning_skips)
    for r in results:
        skipped.update(r.skipped)
        examples += r.examples
    records: list[SampleRecord] = []
    drop: dict[str, set[str]] = {}  # shard -> keys to remove
    seen: set[str] = set()
    keys: set[str] = set()
    for r in results:
        for rec in r.records:
            if rec.key in keys:
                # Two input shards with the same sample key: readers group by key, so keep the first.
                drop.setdefault(rec.shard, set()).add(rec.key)
                skipped["duplicate_key"] += 1
                continue
            keys.add(rec.key)
            if ctx.dedup and rec.sha256 in seen:
                # A task de-duplicates within itself; the same bytes in two tasks are found only here.
                drop.setdefault(rec.shard, set()).add(rec.key)
                skipped["duplicate"] += 1
                if skipped["duplicate"] <= SKIP_EXAMPLES_PER_REASON:
                    examples.append(Skip(rec.source_id, "duplicate",
                                         f"same bytes (sha256 {rec.sha256[:12]}) as an earlier item in this run"))
                continue
            seen.add(rec.sha256)
            records.append(rec)
    shards: list[ShardInfo] = []
    for r in results:
        for info in r.shards:
            if info.name in drop:
                rewritten = _rewrite_without(ctx.part_uri, info, drop[info.name])
                if rewritten is not None:
                    shards.append(rewritten)
            else:
                shards.append(info)
    return records, shards, skipped, examples


def _rewrite_without(part_uri: str, info: ShardInfo, keys: set[str]) -> ShardInfo | None:
    """Republish a shard (same name, not yet indexed) without `keys` (all of them its own); None if
    nothing is left. Streamed: one sample in memory at a time, not the whole shard (up to 1 GiB). The
    old shard is read to the end before the new one replaces it under its name."""
    uri = storage.join(part_uri, info.name)
    if info.samples <= len(keys):
        storage.storage_for(uri).delete(uri)
        return None
    with staging(part_uri) as (folder, publish):
        with ShardWriter(folder, info.samples, name_for=lambda n: info.name, publish=publish) as writer:
            for sample in iter_shard_samples(uri):
                if sample["__key__"] not in keys:
                    writer.write(sample)
    return writer.shards[0]


def _examples(skips: list[Skip]) -> list[Skip]:
    """The first few skips of each reason."""
    counts: Counter[str] = Counter()
    out = []
    for s in skips:
        counts[s.reason] += 1
        if counts[s.reason] <= SKIP_EXAMPLES_PER_REASON:
            out.append(s)
    return out


def _format_counts(counts: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))
