"""The manifest: the completeness marker and table of contents of one part of a dataset.

`manifest.json` is written last and atomically, after every shard it lists is durable in storage
(local or S3). A shard not listed in a manifest does not exist for readers, so a crashed run never
feeds a trainer half a dataset. A dataset is one or more parts listed by `index.json` (dataset.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from data_prep import storage
from data_prep.checks import require_int, require_plain_name
from data_prep.errors import DataPrepError

SCHEMA_VERSION = 2
"""Bumped whenever a reader of the old schema would misread the new one."""

MANIFEST_NAME = "manifest.json"

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class ShardInfo:
    """One shard file listed in a manifest."""

    name: str
    """File name relative to the manifest's directory, e.g. "shard-000000.tar"."""
    samples: int
    """Number of samples (distinct keys) in the tar."""
    bytes: int
    """Size of the tar file in bytes."""
    sha256: str
    """Lower-case hex sha256 of the tar file."""

    def __post_init__(self) -> None:
        # The name is joined to the dataset directory by readers, so it must not escape it.
        require_plain_name(self.name, "shard name (a plain file name inside the manifest's directory)")
        for attr in ("samples", "bytes"):
            require_int(getattr(self, attr), f"shard {self.name}: `{attr}`", 0)
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise DataPrepError(f"shard {self.name}: `sha256` must be 64 lower-case hex digits, got {self.sha256!r}")


@dataclass
class Manifest:
    """Everything a reader needs to trust and use a shard directory."""

    schema_version: int
    """Manifest schema version; readers refuse versions they do not know."""
    shards: list[ShardInfo]
    """The shards of this dataset, in write order."""
    total_samples: int
    """Sum of the shards' sample counts."""
    total_bytes: int
    """Sum of the shards' sizes in bytes."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Source items left out, counted by reason (e.g. {"decode_error": 3})."""
    config: dict[str, Any] = field(default_factory=dict)
    """The configuration that produced the shards (JSON-serialisable)."""
    created_at: str = ""
    """When the manifest was written, ISO 8601 in UTC. Not part of any identity."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Run statistics: items seen, written, skipped, already present, bytes read, duration, samples/s."""
    content_sum: str = "0" * 64
    """Order-free sum of the samples' identities (see dataset.sample_identity), 64 hex digits: parts
    add up, so a dataset's content id does not depend on how its samples were split into parts."""
    samples_file: str = ""
    """Name of the part's sample list (key, content sha256, source id, shard per line), for
    de-duplication and incremental runs; empty if none."""
    samples_sha256: str = ""
    """sha256 of `samples_file`."""

    def __post_init__(self) -> None:
        _check_schema_version(self.schema_version)
        samples = sum(s.samples for s in self.shards)
        size = sum(s.bytes for s in self.shards)
        if self.total_samples != samples or self.total_bytes != size:
            raise DataPrepError(
                f"manifest totals ({self.total_samples} samples, {self.total_bytes} bytes) do not match its "
                f"shard list ({samples} samples, {size} bytes); the manifest is corrupt, re-run `ldmflow shard`"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "shards": [
                {"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256} for s in self.shards
            ],
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "skipped": dict(self.skipped),
            "config": self.config,
            "created_at": self.created_at,
            "stats": self.stats,
            "content_sum": self.content_sum,
            "samples_file": self.samples_file,
            "samples_sha256": self.samples_sha256,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise DataPrepError(f"manifest must be a JSON object, got {type(d).__name__}")
        # Check the version before anything else: a future schema may have renamed every other key.
        if "schema_version" not in d:
            raise DataPrepError(
                "manifest has no `schema_version`; it was not written by ldmflow, re-run `ldmflow shard`"
            )
        _check_schema_version(d["schema_version"])
        missing = [k for k in ("shards", "total_samples", "total_bytes") if k not in d]
        if missing:
            raise DataPrepError(f"manifest is missing {', '.join(missing)}; re-run `ldmflow shard`")
        try:
            shards = [ShardInfo(name=s["name"], samples=s["samples"], bytes=s["bytes"], sha256=s["sha256"])
                      for s in d["shards"]]
        except (KeyError, TypeError) as e:
            raise DataPrepError(f"manifest shard entry is malformed ({e!r}); re-run `ldmflow shard`") from e
        return cls(
            schema_version=d["schema_version"],
            shards=shards,
            total_samples=d["total_samples"],
            total_bytes=d["total_bytes"],
            skipped={str(k): int(v) for k, v in d.get("skipped", {}).items()},
            config=dict(d.get("config", {})),
            created_at=str(d.get("created_at", "")),
            stats=dict(d.get("stats", {})),
            content_sum=str(d.get("content_sum", "0" * 64)),
            samples_file=_samples_file(d.get("samples_file", "")),
            samples_sha256=str(d.get("samples_sha256", "")),
        )

    def to_json_bytes(self) -> bytes:
        """The canonical serialisation: exactly the bytes write_manifest puts in manifest.json."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @property
    def sha256(self) -> str:
        """sha256 of the canonical manifest bytes: names this exact file (not the dataset's content)."""
        return hashlib.sha256(self.to_json_bytes()).hexdigest()


def _check_schema_version(version: Any) -> None:
    if version == SCHEMA_VERSION and not isinstance(version, bool):
        return
    newer = isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION
    fix = "upgrade ldmflow to read it" if newer else "re-run `ldmflow shard` to rebuild it"
    raise DataPrepError(f"manifest schema_version must be {SCHEMA_VERSION}, got {version!r}; {fix}")


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Publish `manifest` as DIR/manifest.json atomically; call only after every shard is durable."""
    uri = storage.join(str(directory), MANIFEST_NAME)
    storage.storage_for(uri).put_bytes(uri, manifest.to_json_bytes())
    return uri


def read_manifest(directory: str) -> Manifest:
    """Load and validate DIR/manifest.json (local or s3://); DataPrepError if missing or malformed."""
    uri = storage.join(str(directory), MANIFEST_NAME)
    store = storage.storage_for(uri)
    if not store.exists(uri):
        raise DataPrepError(
            f"no {MANIFEST_NAME} in {directory}: shards without a manifest are incomplete; run `ldmflow shard` first"
        )
    try:
        d = json.loads(store.read_bytes(uri).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPrepError(f"{uri} is not valid JSON ({e}); re-run `ldmflow shard` with --overwrite") from e
    return Manifest.from_dict(d)


def sample_key(member_name: str) -> str:
    """The WebDataset sample key of a tar member: the path up to the first dot of its base name."""
    head, _, base = member_name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{head}/{stem}" if head else stem


def check_shard(uri: str, shard: ShardInfo) -> list[str]:
    """Problems of one shard against its manifest entry: missing, size, sha256, sample count.

    Reads every byte once (hash and tar listing in the same pass), locally or streamed from S3.
    """
    store = storage.storage_for(uri)
    if not store.exists(uri):
        return [f"{shard.name}: missing"]
    digest = hashlib.sha256()
    size = 0

    class _Tee:
        def __init__(self, f):
            self._f = f

        def read(self, n: int = -1) -> bytes:
            nonlocal size
            data = self._f.read(n)
            digest.update(data)
            size += len(data)
            return data

    problems: list[str] = []
    keys: set[str] = set()
    with store.open_read(uri) as f:
        tee = _Tee(f)
        try:
            with tarfile.open(fileobj=tee, mode="r|") as tar:  # type: ignore[call-overload]
                keys = {sample_key(m.name) for m in tar if m.isfile()}
        except tarfile.TarError as e:
            problems.append(f"{shard.name}: not a readable tar ({e})")
        while tee.read(1 << 20):  # the end-of-archive padding tarfile does not read
            pass
    if size != shard.bytes:
        problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}")
    if digest.hexdigest() != shard.sha256:
        problems.append(f"{shard.name}: sha256 {digest.hexdigest()}, manifest says {shard.sha256}")
    if not problems and len(keys) != shard.samples:
        problems.append(f"{shard.name}: {len(keys)} samples, manifest says {shard.samples}")
    return problems


def verify_shards(directory: str, manifest: Manifest) -> None:
    """Raise DataPrepError naming every listed shard that is missing or differs from the manifest."""
    problems = [p for shard in manifest.shards for p in check_shard(storage.join(str(directory), shard.name), shard)]
    if problems:
        raise DataPrepError(
            f"shards in {directory} do not match {MANIFEST_NAME}: " + "; ".join(problems)
            + "; run `ldmflow shard verify` for a report, and re-run `ldmflow shard --overwrite`"
        )


def _samples_file(name: object) -> str:
    """The manifest's samples file name ("" for parts written without one), checked: it is joined to the part."""
    return "" if name in ("", None) else require_plain_name(name, "manifest `samples_file`")
