"""Sources: find the items of a raw image-text dataset, without reading their bytes.

A source is planned in the parent process into `ItemRef`s (small, picklable references: where the
image is, where or what its caption is), or, for existing shards, into the list of tars to re-shard.
The bytes are read later inside the shard tasks, so listing a million S3 objects costs one paginated
listing, not a million downloads, and the heavy work spreads over processes or Ray workers.

    folder (local or s3://)   image files with a sidecar caption: `cat.txt`, or a field of `cat.json`
    table  (.csv .tsv .jsonl .parquet, local or s3://)   a path-or-URL column and a caption column
    shards (a folder/prefix of .tar, or a dataset with index.json / manifest.json)   re-size, re-shard

Identity: an item is its source bytes (their sha256), never its path: what a dataset already holds is
decided by content, after the bytes are read (shard_task.py). Keys: `key_for(source_id, sha256)`, a
hash of the item's id and its bytes, so the same item gets the same key in every run and two different
images under the same name (batch1/0000.png, batch2/0000.png; an image replaced in place) get two.
URL query strings (signatures, tokens) are not part of a source id unless asked for (`keep_url_query`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from data_prep import storage
from data_prep.checks import require_choice
from data_prep.errors import DataPrepError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""File suffixes treated as images (matched case-insensitively)."""

TABLE_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
"""Manifest-table suffixes and the reader each one gets."""

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Members of an existing WebDataset sample that hold its image, in order of preference."""

SOURCE_FORMATS = ("auto", "folder", "table", "shards")

URL_SCHEMES = ("http://", "https://", "file://", "s3://")


@dataclass(frozen=True)
class ItemRef:
    """Where one source item lives; read and decoded later by a shard task."""

    source_id: str
    """Stable id of the item: folder-relative path, the table's path-or-URL value, or "<shard>/<key>"."""
    image: str
    """URI of the image bytes: a local path, s3://, http(s):// or file://."""
    caption: str | None = None
    """Caption text when the source already holds it (tables)."""
    caption_uri: str | None = None
    """Sidecar file holding the caption (folders): a .txt, or a .json with `caption_field`."""


@dataclass
class Skip:
    """An item left out of the shards, and why; counted in the manifest by `reason`."""

    source_id: str
    """The item's source id (as in ItemRef)."""
    reason: str
    """Short machine-readable reason, e.g. "missing_caption", "corrupt_image"."""
    detail: str
    """Human-readable detail for the log."""


@dataclass
class SourcePlan:
    """What a source holds, before any item's bytes are read."""

    kind: str
    """"folder", "table" or "shards"."""
    items: list[ItemRef] = field(default_factory=list)
    """Items to read, in a stable order (folders and tables)."""
    shards: list[str] = field(default_factory=list)
    """Tar URIs to re-shard, in a stable order (shards)."""
    expected_items: int | None = None
    """How many items the shards hold, when a manifest says so (for progress)."""
    skips: list[Skip] = field(default_factory=list)
    """Items already known to be unusable from the listing alone (e.g. no caption file)."""


@dataclass(frozen=True)
class SourceOptions:
    """How to read a source; part of the shard config."""

    source_format: str = "auto"
    """"folder", "table", "shards", or "auto": a table by suffix, shards if tars or a dataset index are
    found, a folder of images otherwise."""
    url_column: str | None = None
    """Table column with the image path or URL; default: the first of url, image, path, file, filepath."""
    caption_column: str | None = None
    """Table column with the caption; default: the first of caption, text, prompt."""
    caption_field: str = "caption"
    """Field of a `.json` sidecar (folders) or sample (shards) that holds the caption."""
    keep_empty_captions: bool = False
    """Keep table rows with an empty caption cell (otherwise skipped as missing_caption)."""
    follow_symlinks: bool = False
    """Read symlinked folders of a local folder source too (each real folder once); otherwise each is
    counted as a `symlinked_folder` skip, never silently left out."""
    allowed_roots: tuple[str, ...] = ()
    """Folders and s3:// prefixes a table's local paths, file:// URLs and s3:// URIs may point into,
    besides the table's own folder. Anything else in a table (/etc/passwd, file:///root/.ssh/id_rsa,
    another team's bucket) is an `outside_allowed_root` skip: a table from anyone reads only there."""
    keep_url_query: bool = False
    """Keep the query string (and user info, fragment) of http(s) URLs in source ids, which samples'
    .json and samples.jsonl.gz store. Off by default: for signed URLs it is a credential that changes
    with every signing; turn it on only where the query names the image (?id=123) and is no secret."""

    def __post_init__(self) -> None:
        require_choice(self.source_format, "shard config `source_format`", SOURCE_FORMATS)


def key_for(source_id: str, sha256: str) -> str:
    """The shard key of a source item: the first 16 hex digits of sha1(source_id, source bytes sha256).

    A hash rather than the path itself because WebDataset splits member names at the first dot and
    treats slashes as directories, so file names make invalid or colliding keys. The bytes are in it
    so that a key names one item's one content: the same item gets the same key in every run, and two
    different images that share a name (two batches numbered alike, an image replaced in place) get two
    keys instead of the second being taken for the first.
    16 hex digits = 64 bits: the chance of any collision stays below 1e-3 up to ~190M items.
    """
    return hashlib.sha1(f"{source_id}\0{sha256}".encode("utf-8")).hexdigest()[:16]


def url_source_id(ref: str, keep_query: bool) -> str:
    """A table cell as the item's source id: http(s) URLs without user info, query and fragment (unless
    `keep_query`), so a re-signed URL is the same item and no signature is stored; others as they are."""
    if keep_query or not ref.startswith(("http://", "https://")):
        return ref
    parts = urlsplit(ref)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def plan_source(source: str, options: SourceOptions) -> SourcePlan:
    """List `source` into a SourcePlan; DataPrepError (before any work) if it is missing or unusable."""
    source = os.fspath(source)
    fmt = options.source_format
    if fmt == "auto":
        fmt = _detect_format(source)
    if fmt == "table":
        return _plan_table(source, options)
    store = storage.storage_for(source)
    store.check_readable(source)
    if fmt == "shards":
        return _plan_shards(source)
    if isinstance(store, storage.LocalStorage):
        plan = _plan_folder(source, store.list(source, follow_links=options.follow_symlinks))
        if not options.follow_symlinks:
            plan.skips.extend(Skip(f"{link}/", "symlinked_folder", "a symlinked folder, not followed; pass "
                                   "--follow-symlinks to read it") for link in store.linked_folders(source))
        return plan
    return _plan_folder(source, store.list(source))


def _detect_format(source: str) -> str:
    if _table_kind(source) is not None:
        return "table"
    store = storage.storage_for(source)
    store.check_readable(source)
    if store.exists(storage.join(source, "index.json")) or store.exists(storage.join(source, "manifest.json")):
        return "shards"
    listing = store.list(source)
    if listing and all(o.name.endswith(".tar") for o in listing if not _hidden(o.name)):
        return "shards"
    return "folder"


def _hidden(name: str) -> bool:
    return any(part.startswith((".", "_")) for part in name.split("/"))


# --- folders -----------------------------------------------------------------------------------


def _plan_folder(root: str, listing: list[storage.ObjectInfo]) -> SourcePlan:
    """Images under `root` in sorted relative-path order, each paired with its sidecar caption.

    Images under hidden names (a file or folder starting with "." or "_") are not read but counted as
    `hidden_path` skips: they are mostly tool debris such as macOS `._cat.jpg` resource forks or
    `.ipynb_checkpoints` copies, which would otherwise show up as corrupt or duplicate images (and "_"
    prefixes are where this project keeps its own state), but a folder renamed by mistake is seen.
    """
    names = {o.name for o in listing if not _hidden(o.name)}
    # Each object by the URI its listing gave: re-joined from its name, an S3 key such as "raw//a.png"
    # would lose a slash and name another object (or none).
    uris = {o.name: o.uri for o in listing}
    plan = SourcePlan(kind="folder")
    for name in sorted(o.name for o in listing if _hidden(o.name)):
        if posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            plan.skips.append(Skip(name, "hidden_path", "a file or folder in its path starts with '.' or '_'"))
    for name in sorted(names):
        stem, ext = posixpath.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = next((c for c in (f"{stem}.txt", f"{stem}.json") if c in names), None)
        if caption is None:
            plan.skips.append(Skip(name, "missing_caption", f"no caption file {stem}.txt or {stem}.json"))
            continue
        plan.items.append(ItemRef(source_id=name, image=uris[name], caption_uri=uris[caption]))
    if not plan.items and not plan.skips:
        raise DataPrepError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}; pass a folder of images with same-named "
            ".txt or .json captions, a table (.csv/.tsv/.jsonl/.parquet), or a folder of .tar shards"
        )
    return plan


def read_sidecar_caption(data: bytes, uri: str, caption_field: str) -> str:
    """The raw caption in a sidecar file's bytes; ValueError subclasses for undecodable content.

    UnicodeDecodeError for text that is not UTF-8 (utf-8-sig: editors on Windows prepend a BOM, which
    would otherwise end up in the caption); KeyError if a .json sidecar lacks the field.
    """
    text = data.decode("utf-8-sig")
    if uri.lower().endswith(".json"):
        value = json.loads(text).get(caption_field)
        if value is None:
            raise KeyError(caption_field)
        return str(value)
    return text


# --- tables ------------------------------------------------------------------------------------


def _table_kind(source: str) -> str | None:
    lower = source.lower()
    for suffix in (".gz", ""):
        if suffix and not lower.endswith(suffix):
            continue
        stem = lower[: len(lower) - len(suffix)] if suffix else lower
        ext = posixpath.splitext(stem)[1]
        if ext in TABLE_EXTENSIONS:
            return TABLE_EXTENSIONS[ext]
    return None


_URL_COLUMNS = ("url", "image", "image_url", "path", "file", "filepath", "image_path")
_CAPTION_COLUMNS = ("caption", "text", "prompt", "TEXT")


def _plan_table(source: str, options: SourceOptions) -> SourcePlan:
    """One ItemRef per row; relative paths resolve against the table's own folder.

    Text is decoded as UTF-8 with surrogate escapes, so one row with broken bytes is skipped as
    `caption_not_utf8` (or `not_utf8_path`) instead of failing a million-row table.
    """
    kind = _table_kind(source)
    store = storage.storage_for(source)
    store.check_readable(source)
    data = store.read_bytes(source)
    if source.lower().endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    try:
        columns, rows = _read_table(data, kind)
    except Exception as e:  # csv, json and arrow raise many types for a malformed file; all mean the same here
        raise DataPrepError(f"cannot read table {source} as {kind}: {type(e).__name__}: {e}") from e
    url_col = _pick_column(columns, options.url_column, _URL_COLUMNS, "url_column", source)
    cap_col = _pick_column(columns, options.caption_column, _CAPTION_COLUMNS, "caption_column", source)
    base = posixpath.dirname(source) if storage.is_s3(source) else os.path.dirname(os.path.abspath(source))
    roots = [base, *options.allowed_roots]
    plan = SourcePlan(kind="table")
    for row, record in enumerate(rows):
        ref, caption = record.get(url_col), record.get(cap_col)
        ref = "" if _missing(ref) else str(ref).strip()
        source_id = url_source_id(ref, options.keep_url_query)
        label = source_id or f"row {row + 1}"
        if not ref:
            plan.skips.append(Skip(label, "missing_image", f"row {row + 1}: empty `{url_col}`"))
        elif not _is_utf8(ref):
            plan.skips.append(Skip(label, "not_utf8_path", f"row {row + 1}: `{url_col}` is not valid UTF-8"))
        elif _missing(caption) and not options.keep_empty_captions:
            plan.skips.append(Skip(label, "missing_caption", f"row {row + 1}: no `{cap_col}`"))
        elif not _is_utf8(str(caption)):
            plan.skips.append(Skip(label, "caption_not_utf8", f"row {row + 1}: `{cap_col}` is not valid UTF-8"))
        elif (image := _resolve_row(ref, base)) is None or not any(_inside(image, root) for root in roots):
            plan.skips.append(Skip(label, "outside_allowed_root", f"row {row + 1}: {label!r} is outside {base} and "
                                   "the allowed roots; pass --allow-root to read there"))
        else:
            plan.items.append(ItemRef(source_id=source_id, image=image,
                                      caption="" if _missing(caption) else str(caption)))
    if not plan.items and not plan.skips:
        raise DataPrepError(f"table {source} has no rows")
    return plan


def _resolve_row(ref: str, base: str) -> str | None:
    """A table cell as the URI it names: http(s) URLs as they are; s3:// URIs, local paths and file://
    URLs normalised, relative ones against the table's folder `base` (so `..` cannot hide where they
    point); None for one that names nothing readable."""
    if ref.startswith(("http://", "https://")):
        return ref
    if ref.startswith("s3://") or (storage.is_s3(base) and not ref.startswith("file://") and not os.path.isabs(ref)):
        bucket, _, key = (ref if ref.startswith("s3://") else f"{base.rstrip('/')}/{ref}")[len("s3://"):].partition("/")
        key = posixpath.normpath(key) if key else ""
        return None if not bucket or key in ("", ".") or key.startswith("..") else f"s3://{bucket}/{key}"
    try:
        path = storage.local_path(ref) if ref.startswith("file://") else os.path.join(base, ref)
    except storage.StorageError:
        return None
    return os.path.realpath(path)  # os.path.join keeps an absolute `ref` as it is


def _inside(uri: str, root: str) -> bool:
    """Whether `uri` (as _resolve_row gives it) is `root` or below it; http(s) URLs are never local."""
    if uri.startswith(("http://", "https://")):
        return True  # no file system: the fetcher's host checks apply to them
    if storage.is_s3(uri) != storage.is_s3(root):
        return False
    if storage.is_s3(uri):
        return uri == root.rstrip("/") or uri.startswith(root.rstrip("/") + "/")
    root = os.path.realpath(storage.local_path(root))
    return uri == root or uri.startswith(root.rstrip(os.sep) + os.sep)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 in the file
        return False
    return True


def _missing(value: object) -> bool:
    # None or NaN (pandas' empty cell in non-string columns) or an empty string cell.
    return value is None or (isinstance(value, float) and value != value) or value == ""


def _read_table(data: bytes, kind: str | None) -> tuple[list[str], list[dict]]:
    """(column names, rows as dicts) of a table file's bytes."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        return list(table.column_names), table.to_pylist()
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if kind == "jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return columns, rows
    import csv

    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def _pick_column(columns: list[str], wanted: str | None, defaults: tuple[str, ...], option: str, source: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataPrepError(
                f"table {source} has no column {wanted!r} (shard config `{option}`); its columns: {', '.join(columns)}"
            )
        return wanted
    found = next((c for c in defaults if c in columns), None)
    if found is None:
        raise DataPrepError(
            f"table {source} has none of the columns {', '.join(defaults)}; set `{option}` "
            f"(--{option.replace('_', '-')}) to one of: {', '.join(columns)}"
        )
    return found


# --- existing shards ---------------------------------------------------------------------------


def _plan_shards(source: str) -> SourcePlan:
    """The tars of a dataset (through its index or manifest when present, else every .tar found)."""
    from data_prep.dataset import is_dataset, read_dataset

    if is_dataset(source):
        dataset = read_dataset(source)
        return SourcePlan(kind="shards", shards=[s.uri for s in dataset.shards],
                          expected_items=dataset.total_samples)
    tars = [o.uri for o in storage.storage_for(source).list(source) if o.name.endswith(".tar") and not _hidden(o.name)]
    if not tars:
        raise DataPrepError(f"no .tar shards found in {source}")
    return SourcePlan(kind="shards", shards=sorted(tars))


OVERSIZED = "__oversized__"
"""The key a sample of iter_shard_samples gets for members it did not read (their names and sizes)."""


def iter_shard_samples(uri: str, *, max_member_bytes: int | None = None) -> Iterator[dict[str, bytes | str]]:
    """Samples of a WebDataset tar as {"__key__": key, ext: bytes}, streamed through the storage layer.
    A member over `max_member_bytes` is not read into memory (a tar from anyone may hold a member of
    any size): it is named under OVERSIZED instead."""
    import tarfile

    with storage.storage_for(uri).open_read(uri) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        current: dict[str, bytes | str] | None = None
        for member in tar:
            if not member.isfile():
                continue
            head, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{head}/{stem}" if head else stem
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            if max_member_bytes is not None and member.size > max_member_bytes:
                current[OVERSIZED] = f"{current.get(OVERSIZED, '')} {base} ({member.size} bytes)".strip()
                continue  # the stream skips its data
            f = tar.extractfile(member)
            current[ext.lower()] = f.read() if f is not None else b""
        if current is not None:
            yield current
