"""Source readers: turn raw data into (key, source id, bytes, caption) items or counted skips.

Readers only read bytes; decoding belongs to the shard stage so it can run in worker processes and
so every reader gets the same validation.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataPrepError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
"""File suffixes treated as images (matched case-insensitively)."""


@dataclass
class SourceItem:
    """One image with its caption, not yet decoded."""

    key: str
    """Shard key: stable for the same source_id, unique, and free of dots and slashes."""
    source_id: str
    """Where the item came from: the path relative to the source root, with forward slashes."""
    data: bytes
    """The file's raw bytes."""
    caption: str
    """Caption text, stripped of surrounding whitespace."""


@dataclass
class Skip:
    """An item left out of the shards, and why; counted in the manifest by `reason`."""

    source_id: str
    """The item's source id (as in SourceItem)."""
    reason: str
    """Short machine-readable reason, e.g. "missing_caption", "decode_error"."""
    detail: str
    """Human-readable detail for the log."""


def key_for(source_id: str) -> str:
    """The shard key of a source item: the first 16 hex digits of sha1(source_id).

    A hash rather than the path itself because WebDataset splits member names at the first dot and
    treats slashes as directories, so file names make invalid or colliding keys; and a hash of the id
    (not of the bytes) keeps the key stable when an image is re-encoded or its caption edited.
    16 hex digits = 64 bits: the chance of any collision stays below 1e-3 up to ~190M items, and the
    shard stage checks for duplicates anyway.
    """
    return hashlib.sha1(source_id.encode("utf-8")).hexdigest()[:16]


def iter_image_folder(root: str | os.PathLike[str]) -> Iterator[SourceItem | Skip]:
    """Every image under `root` (recursively, in sorted relative-path order) with its `.txt` caption.

    The caption of `a/b/cat.jpg` is `a/b/cat.txt`. Images without a caption file, with an empty one,
    or that cannot be read are yielded as Skip. Hidden files and folders (names starting with ".")
    are ignored: they are tool debris such as macOS `._cat.jpg` resource forks or
    `.ipynb_checkpoints` copies, which would otherwise show up as corrupt or duplicate images.

    Raises DataPrepError at call time, not at the first `next()`, if `root` is not a directory.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataPrepError(
            f"source folder {str(base)!r} does not exist or is not a directory; "
            "pass --source a folder of images with same-named .txt captions"
        )
    return _iter_folder(base)


def _iter_folder(base: Path) -> Iterator[SourceItem | Skip]:
    for rel in _image_paths(base):
        source_id = rel.as_posix()
        path = base / rel
        try:
            caption_bytes = path.with_suffix(".txt").read_bytes()
        except FileNotFoundError:
            yield Skip(source_id, "missing_caption", f"no caption file {rel.with_suffix('.txt').as_posix()}")
            continue
        except OSError as e:
            yield Skip(source_id, "unreadable_file", f"caption: {e}")
            continue
        try:
            # utf-8-sig: editors on Windows often prepend a BOM, which would end up in the caption.
            caption = caption_bytes.decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            yield Skip(source_id, "unreadable_file", f"caption is not UTF-8: {e}")
            continue
        if not caption:
            yield Skip(source_id, "empty_caption", "caption file is empty")
            continue
        try:
            data = path.read_bytes()
        except OSError as e:
            yield Skip(source_id, "unreadable_file", str(e))
            continue
        yield SourceItem(key=key_for(source_id), source_id=source_id, data=data, caption=caption)


def _image_paths(base: Path) -> list[Path]:
    found: list[Path] = []
    # os.walk without following symlinks: a link loop cannot hang the run.
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(base)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(rel_dir / name)
    # Sort on the posix string, not os.walk order, which depends on the filesystem.
    found.sort(key=lambda p: p.as_posix())
    return found
