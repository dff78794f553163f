"""The shard stage: an image folder with captions -> WebDataset shards + manifest.

    iter_image_folder ──▶ process_item (decode, resize, encode) ──▶ ShardWriter ──▶ write_manifest
         │ Skip                     │ Skip("decode_error")                              (last)
         └──────────── counted by reason in manifest.skipped ◀─────────┘

`process_item` is a pure function of (item, config), so a process pool can run it later without
changing anything else; the writer stays in the parent so shard order and contents are deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.image_ops import IMAGE_FORMATS, ImageDecodeError, decode_image, encode_image, resize_center_crop
from data_prep.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, ShardInfo, write_manifest
from data_prep.shard_writer import SHARD_PATTERN, ShardWriter
from data_prep.sources import Skip, SourceItem, iter_image_folder

log = logging.getLogger(__name__)

_SKIPS_LOGGED_PER_REASON = 20  # enough to find the pattern without flooding the log on a bad source


@dataclass
class ShardConfig:
    """Settings of one `ldmflow shard` run; stored verbatim in the manifest."""

    source: str
    """Folder of images (searched recursively) with same-named .txt caption files."""
    output: str
    """Folder to write shard-NNNNNN.tar files and manifest.json into (created if missing)."""
    resolution: int = 64
    """Side in pixels of the square images stored in the shards (shorter side resized, centre cropped)."""
    samples_per_shard: int = 1000
    """Maximum samples per tar; aim for shards of 100 MB-1 GB so readers stream efficiently."""
    image_format: str = "jpg"
    """Image encoding inside the shards: jpg, png or webp."""
    quality: int = 95
    """JPEG/WebP quality, 1-100 (ignored for png)."""
    overwrite: bool = False
    """Replace an existing dataset in `output`; without it an existing manifest stops the run."""

    def __post_init__(self) -> None:
        # Paths as plain strings, so asdict(config) is JSON-serialisable for the manifest.
        self.source = os.fspath(self.source)
        self.output = os.fspath(self.output)
        self.image_format = str(self.image_format).lower()
        _check_int("resolution", self.resolution, 8, 4096)
        _check_int("samples_per_shard", self.samples_per_shard, 1, None)
        _check_int("quality", self.quality, 1, 100)
        if self.image_format not in IMAGE_FORMATS:
            raise DataPrepError(
                f"shard config `image_format` must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}"
            )
        if not isinstance(self.overwrite, bool):
            raise DataPrepError(f"shard config `overwrite` must be true or false, got {self.overwrite!r}")


def _check_int(name: str, value: object, lo: int, hi: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        allowed = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise DataPrepError(f"shard config `{name}` must be {allowed}, got {value!r}")


def process_item(item: SourceItem, config: ShardConfig) -> dict[str, object] | Skip:
    """Decode, resize and re-encode one source item into a shard sample, or say why it is skipped."""
    try:
        image = decode_image(item.data)
    except ImageDecodeError as e:
        return Skip(item.source_id, "decode_error", str(e))
    original_size = image.size
    processed = resize_center_crop(image, config.resolution)
    meta = {
        "source_id": item.source_id,
        "original_size": list(original_size),
        "sha256": hashlib.sha256(item.data).hexdigest(),
        "processed_size": list(processed.size),
    }
    return {
        "__key__": item.key,
        config.image_format: encode_image(processed, config.image_format, config.quality),
        "txt": item.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def build_shards(config: ShardConfig, *, progress: Callable[[int], None] | None = None) -> Manifest:
    """Turn `config.source` into shards plus a manifest in `config.output`, and return the manifest.

    `progress`, if given, is called after each source item with the number of items handled so far
    (written or skipped). Bad items are skipped and counted by reason; bad input as a whole (missing
    source, existing dataset without overwrite, nothing usable) raises DataPrepError, with no manifest
    written.
    """
    # Check the whole input before touching the output: fail fast, leave nothing behind.
    items = iter_image_folder(config.source)
    output = Path(config.output)
    _prepare_output(output, overwrite=config.overwrite)

    skipped: Counter[str] = Counter()
    seen_keys: set[str] = set()
    handled = 0

    def log_shard(info: ShardInfo) -> None:
        log.info("wrote %s: %d samples, %.1f MB (%d items handled, %d skipped)",
                 info.name, info.samples, info.bytes / 1e6, handled, sum(skipped.values()))

    writer = ShardWriter(output, config.samples_per_shard, on_shard=log_shard)
    try:
        with writer:
            for item in items:
                result = item if isinstance(item, Skip) else process_item(item, config)
                handled += 1
                if isinstance(result, Skip):
                    skipped[result.reason] += 1
                    if skipped[result.reason] <= _SKIPS_LOGGED_PER_REASON:
                        log.warning("skip %s (%s): %s", result.source_id, result.reason, result.detail)
                        if skipped[result.reason] == _SKIPS_LOGGED_PER_REASON:
                            log.warning("further %s skips are counted but not logged", result.reason)
                else:
                    key = str(result["__key__"])
                    if key in seen_keys:
                        # Keys are a 64-bit hash of the source path; a repeat means a bug or a collision,
                        # and either would silently drop a sample in readers that group by key.
                        raise DataPrepError(
                            f"duplicate shard key {key} (source {item.source_id}); keys must be unique, "
                            "report this with the two source paths"
                        )
                    seen_keys.add(key)
                    writer.write(result)
                if progress is not None:
                    progress(handled)
        if not writer.shards:
            raise DataPrepError(
                f"no usable images in {config.source} (skipped: {_format_counts(skipped) or 'none found'}); "
                "each image needs a non-empty same-named .txt caption and must be decodable"
            )
    except BaseException:
        # Completed shards of a failed run are unusable without a manifest; remove them so the output
        # folder holds nothing that looks like data.
        for info in writer.shards:
            (output / info.name).unlink(missing_ok=True)
        raise

    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        shards=list(writer.shards),
        total_samples=sum(s.samples for s in writer.shards),
        total_bytes=sum(s.bytes for s in writer.shards),
        skipped=dict(sorted(skipped.items())),
        config=asdict(config),
        created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    )
    write_manifest(output, manifest)
    log.info("dataset ready in %s: %d samples in %d shards, skipped %s, manifest sha256 %s",
             output, manifest.total_samples, len(manifest.shards), _format_counts(skipped) or "none",
             manifest.sha256[:12])
    return manifest


def _prepare_output(output: Path, *, overwrite: bool) -> None:
    manifest_path = output / MANIFEST_NAME
    if manifest_path.exists():
        if not overwrite:
            raise DataPrepError(
                f"{output} already holds a dataset ({MANIFEST_NAME} exists); pass --overwrite to replace it "
                "or choose another --output"
            )
        # Manifest first: from this moment readers see no dataset, never a manifest naming deleted shards.
        manifest_path.unlink()
        log.info("removed old %s from %s (--overwrite)", MANIFEST_NAME, output)
    if output.is_dir():
        # Without a manifest, any shards here are an earlier run's leftovers (unpublished or overwritten);
        # stale high-numbered ones would otherwise linger beside the new set.
        stale = sorted(output.glob(SHARD_PATTERN)) + sorted(output.glob(".shard-*.tar.tmp"))
        for path in stale:
            path.unlink()
        if stale:
            log.info("removed %d stale shard files from %s", len(stale), output)
    elif output.exists():
        raise DataPrepError(f"output {output} exists and is not a directory; choose another --output")
    output.mkdir(parents=True, exist_ok=True)


def _format_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))
