"""The tar writer: tarfile-identical bytes, limits by samples and bytes, nothing partial on failure."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from data_prep.errors import DataPrepError
from data_prep.shard_writer import TAR_MTIME, ShardWriter, shard_name, ustar_header


def samples(n: int, size: int = 700) -> list[dict]:
    return [{"__key__": f"k{i:04d}", "jpg": bytes([i % 251]) * (size + i), "txt": f"caption {i}".encode(),
             "json": b"{}"} for i in range(n)]


def tarfile_bytes(batch: list[dict]) -> bytes:
    """The same samples written by the standard library's tarfile, with the writer's fixed fields."""
    buf = io.BytesIO()
    with tarfile.TarFile(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in batch:
            for ext in sorted(k for k in sample if k != "__key__"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(sample[ext]), TAR_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(sample[ext]))
    return buf.getvalue()


def test_header_and_shards_are_byte_identical_to_tarfile(tmp_path):
    info = tarfile.TarInfo("0123456789abcdef.latent.npy")
    info.size, info.mtime, info.mode = 123456, TAR_MTIME, 0o644
    info.uname = info.gname = ""
    assert ustar_header(info.name, info.size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")

    batch = samples(5)
    with ShardWriter(tmp_path, samples_per_shard=5) as writer:
        for sample in batch:
            writer.write(sample)
    data = (tmp_path / shard_name(0)).read_bytes()
    assert data == tarfile_bytes(batch)
    assert writer.shards[0].sha256 == hashlib.sha256(data).hexdigest() and writer.shards[0].bytes == len(data)


def test_limits_by_count_and_bytes(tmp_path):
    with ShardWriter(tmp_path / "count", samples_per_shard=4) as writer:
        for sample in samples(10):
            writer.write(sample)
    assert [s.samples for s in writer.shards] == [4, 4, 2]

    limit = 20 * 1024
    with ShardWriter(tmp_path / "bytes", samples_per_shard=1000, max_bytes=limit) as writer:
        for sample in samples(30, size=2000):
            writer.write(sample)
    assert sum(s.samples for s in writer.shards) == 30 and len(writer.shards) > 1
    for s in writer.shards:
        assert s.bytes <= limit and (tmp_path / "bytes" / s.name).stat().st_size == s.bytes
    with ShardWriter(tmp_path / "big", samples_per_shard=10, max_bytes=limit) as writer:
        writer.write(samples(1, size=50_000)[0])  # bigger than the limit alone: a shard of its own
    assert [s.samples for s in writer.shards] == [1]


def test_failure_leaves_only_completed_shards_and_no_temp_file(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, samples_per_shard=3) as writer:
        for sample in samples(5):
            writer.write(sample)
        raise RuntimeError("the source broke")
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_name(0)]
    with pytest.raises(DataPrepError, match="sample key"), ShardWriter(tmp_path / "x") as writer:
        writer.write({"__key__": "a.b", "jpg": b"x"})
