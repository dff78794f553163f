"""A dataset: parts listed by `index.json`, each part a folder of shards with its own manifest.

    OUTPUT/index.json                      the dataset: its parts, totals, content id (written last)
    OUTPUT/part-00000-<run>/manifest.json  one run's shards, skips, stats (written before the index)
    OUTPUT/part-00000-<run>/samples.jsonl.gz   key, content sha256, source id and shard of each sample
    OUTPUT/part-00000-<run>/digests.bin    the part's sorted source sha256s (known.py; derived, rebuildable)
    OUTPUT/part-00000-<run>/shard-000000-000.tar ...

The first `ldmflow shard` run writes part 0; a later run over a grown source writes only the new items
as another part and republishes the index. Readers (the training loader, `ldmflow shard verify`) take
either an index or a single part's manifest. Only what an index (or, read directly, a manifest) lists
exists: a part folder an index does not name is a crashed run's leftovers, removed by the next run.

Identity: every sample contributes sha256(key, source bytes sha256, caption); a part's `content_sum`
is the sum of those numbers mod 2**256, and the dataset's content id hashes the processing options
with the sum over all parts. So the same input with the same options gives the same id whatever the
time, the output folder, the number of processes, or how the items were split into incremental parts.
(An additive multiset hash: fine for naming datasets, not a defence against crafted collisions.)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from data_prep import storage
from data_prep.checks import require_plain_name
from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST_NAME, Manifest, check_shard, read_manifest

INDEX_NAME = "index.json"
INDEX_SCHEMA_VERSION = 1
SAMPLES_NAME = "samples.jsonl.gz"
DIGESTS_NAME = "digests.bin"
"""The part's sorted source digests (known.py): derived from the samples file, so not in the manifest."""
PART_PREFIX = "part-"
_MOD = 2**256


@dataclass(frozen=True)
class SampleRecord:
    """One written sample, as listed in a part's samples file."""

    key: str
    sha256: str
    """sha256 of the item's source bytes: what exact de-duplication compares."""
    source_id: str
    shard: str
    caption: str = ""

    @property
    def identity(self) -> int:
        return sample_identity(self.key, self.sha256, self.caption)


def sample_identity(key: str, source_sha256: str, caption: str) -> int:
    """The number a sample adds to its part's content sum."""
    digest = hashlib.sha256(f"{key}\0{source_sha256}\0{caption}".encode()).digest()
    return int.from_bytes(digest, "big")


def content_sum(identities: Iterable[int]) -> str:
    return f"{sum(identities) % _MOD:064x}"


def add_sums(sums: Iterable[str]) -> str:
    return f"{sum(int(s, 16) for s in sums) % _MOD:064x}"


def content_id(options: dict[str, Any], total_sum: str) -> str:
    """The dataset's identity: its processing options and the order-free sum of its samples."""
    canonical = json.dumps({"options": options, "content_sum": total_sum}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_samples(part_uri: str, records: list[SampleRecord]) -> tuple[str, str]:
    """Write the part's samples file; returns (name, sha256). Deterministic bytes (gzip mtime 0)."""
    lines = "".join(json.dumps({"key": r.key, "sha256": r.sha256, "source_id": r.source_id, "shard": r.shard,
                                "caption": r.caption}, ensure_ascii=False, sort_keys=True) + "\n"
                    for r in records)
    data = gzip.compress(lines.encode("utf-8"), mtime=0)
    uri = storage.join(part_uri, SAMPLES_NAME)
    storage.storage_for(uri).put_bytes(uri, data)
    return SAMPLES_NAME, hashlib.sha256(data).hexdigest()


def read_samples(part_uri: str, manifest: Manifest) -> list[SampleRecord]:
    if not manifest.samples_file:
        return []
    uri = storage.join(part_uri, manifest.samples_file)
    data = storage.storage_for(uri).read_bytes(uri)
    if manifest.samples_sha256 and hashlib.sha256(data).hexdigest() != manifest.samples_sha256:
        raise DataPrepError(f"{uri} does not match the sha256 in its manifest; re-run `ldmflow shard --overwrite`")
    with gzip.open(io.BytesIO(data), "rt", encoding="utf-8") as f:
        return [SampleRecord(**json.loads(line)) for line in f if line.strip()]


@dataclass(frozen=True)
class ShardRef:
    """A shard as readers see it: where it is and what its manifest promises."""

    uri: str
    name: str
    """Name relative to the dataset root, e.g. "part-00000-ab12/shard-000000-000.tar"."""
    samples: int
    bytes: int
    sha256: str


@dataclass
class Part:
    name: str
    """Folder name relative to the dataset root ("" when a single manifest was read directly)."""
    uri: str
    manifest: Manifest


@dataclass
class Dataset:
    """Every part of a dataset, read and validated; what training and verification consume."""

    uri: str
    parts: list[Part]
    options: dict[str, Any] = field(default_factory=dict)
    """Processing options shared by all parts (resolution, resize mode, format, ...)."""

    @property
    def shards(self) -> list[ShardRef]:
        return [ShardRef(uri=storage.join(p.uri, s.name), name=f"{p.name}/{s.name}" if p.name else s.name,
                         samples=s.samples, bytes=s.bytes, sha256=s.sha256)
                for p in self.parts for s in p.manifest.shards]

    @property
    def total_samples(self) -> int:
        return sum(p.manifest.total_samples for p in self.parts)

    @property
    def total_bytes(self) -> int:
        return sum(p.manifest.total_bytes for p in self.parts)

    @property
    def content_sum(self) -> str:
        return add_sums(p.manifest.content_sum for p in self.parts)

    @property
    def content_id(self) -> str:
        return content_id(self.options, self.content_sum)

    @property
    def resolution(self) -> int | None:
        value = self.options.get("resolution")
        return int(value) if value is not None and self.options.get("resize_mode", "center_crop") != "none" else None

    def skipped(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.parts:
            for reason, n in p.manifest.skipped.items():
                out[reason] = out.get(reason, 0) + n
        return dict(sorted(out.items()))


def is_dataset(uri: str) -> bool:
    store = storage.storage_for(uri)
    return store.exists(storage.join(uri, INDEX_NAME)) or store.exists(storage.join(uri, MANIFEST_NAME))


def read_index(uri: str) -> dict[str, Any] | None:
    """The dataset's index.json as a dict, or None if there is none."""
    index_uri = storage.join(uri, INDEX_NAME)
    store = storage.storage_for(index_uri)
    if not store.exists(index_uri):
        return None
    try:
        index = json.loads(store.read_bytes(index_uri).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPrepError(f"{index_uri} is not valid JSON ({e}); re-run `ldmflow shard --overwrite`") from e
    version = index.get("schema_version") if isinstance(index, dict) else None
    if version != INDEX_SCHEMA_VERSION:
        raise DataPrepError(f"{index_uri} has schema_version {version!r}, expected {INDEX_SCHEMA_VERSION}; "
                            "upgrade ldmflow or re-run `ldmflow shard --overwrite`")
    return index


def read_dataset(uri: str) -> Dataset:
    """The dataset at `uri`: through its index.json, or a single part through its manifest.json."""
    uri = str(uri)
    index = read_index(uri)
    if index is None:
        manifest = read_manifest(uri)  # raises with a clear message if there is none either
        return Dataset(uri=uri, parts=[Part(name="", uri=uri, manifest=manifest)],
                       options=dict(manifest.config.get("options", manifest.config)))
    parts = []
    for entry in index.get("parts", []):
        # Joined to the dataset and, with --overwrite, deleted: a name must not reach outside it.
        name = require_plain_name(entry.get("name") if isinstance(entry, dict) else None,
                                  f"{uri}/{INDEX_NAME}: a part name")
        part_uri = storage.join(uri, name)
        manifest = read_manifest(part_uri)
        if manifest.sha256 != entry.get("manifest_sha256"):
            raise DataPrepError(
                f"{part_uri}/{MANIFEST_NAME} does not match the sha256 recorded in {uri}/{INDEX_NAME}; "
                "the dataset was modified outside ldmflow, re-run `ldmflow shard --overwrite`"
            )
        parts.append(Part(name=name, uri=part_uri, manifest=manifest))
    if not parts:
        raise DataPrepError(f"{uri}/{INDEX_NAME} lists no parts; re-run `ldmflow shard`")
    return Dataset(uri=uri, parts=parts, options=dict(index.get("options", {})))


def write_index(uri: str, parts: list[Part], options: dict[str, Any]) -> dict[str, Any]:
    """Publish index.json listing `parts` (atomically; the step that makes a new part visible)."""
    dataset = Dataset(uri=uri, parts=parts, options=options)
    index = {
        "schema_version": INDEX_SCHEMA_VERSION,
        "parts": [{"name": p.name, "manifest_sha256": p.manifest.sha256, "samples": p.manifest.total_samples,
                   "content_sum": p.manifest.content_sum} for p in parts],
        "total_samples": dataset.total_samples,
        "total_bytes": dataset.total_bytes,
        "options": options,
        "content_id": dataset.content_id,
    }
    data = (json.dumps(index, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    index_uri = storage.join(uri, INDEX_NAME)
    storage.storage_for(index_uri).put_bytes(index_uri, data)
    return index


@dataclass
class VerifyReport:
    """What `ldmflow shard verify` found."""

    uri: str
    shards: int
    samples: int
    problems: list[str]
    """Listed shards that are missing or differ from their manifest (size, sha256, sample count)."""
    orphans: list[str]
    """Files under the dataset that nothing lists (leftovers of a crashed run); harmless to readers."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(uri: str) -> VerifyReport:
    """Check every shard of the dataset at `uri` against its manifest, reading every byte."""
    dataset = read_dataset(uri)
    problems: list[str] = []
    for shard in dataset.shards:
        problems += [f"{shard.name.rpartition('/')[0] + '/' if '/' in shard.name else ''}{p}"
                     for p in check_shard(shard.uri, _info(shard))]
    for part in dataset.parts:
        try:
            read_samples(part.uri, part.manifest)
        except (DataPrepError, storage.StorageError, OSError, ValueError) as e:
            problems.append(f"{part.name or '.'}: samples file: {e}")
    listed = {s.name for s in dataset.shards} | {INDEX_NAME}
    for part in dataset.parts:
        prefix = f"{part.name}/" if part.name else ""
        listed |= {prefix + MANIFEST_NAME, prefix + part.manifest.samples_file, prefix + DIGESTS_NAME}
        # Files a manifest's writer keeps beside it (a latent dataset's empty-caption states).
        listed |= {prefix + str(name) for name in part.manifest.config.get("files", [])}
    orphans = [o.name for o in storage.storage_for(uri).list(uri) if o.name not in listed]
    return VerifyReport(uri=uri, shards=len(dataset.shards), samples=dataset.total_samples, problems=problems,
                        orphans=orphans)


def _info(shard: ShardRef):
    from data_prep.manifest import ShardInfo

    return ShardInfo(name=shard.name.rpartition("/")[2], samples=shard.samples, bytes=shard.bytes,
                     sha256=shard.sha256)
