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


def test_a_shard_rewritten_without_some_keys_is_streamed(tmp_path, monkeypatch):
    """Dropping the duplicates two tasks wrote held the whole shard (up to 1 GiB) in memory."""
    from data_prep import shard as shard_module
    from data_prep.shard_writer import ShardWriter as Writer

    part = tmp_path / "part"
    part.mkdir()
    samples = [{"__key__": f"k{i}", "jpg": bytes([i]) * 1000, "txt": f"caption {i}".encode()} for i in range(6)]
    with Writer(part, 10, name_for=lambda n: "shard-000.tar") as writer:
        for s in samples:
            writer.write(s)
    info = writer.shards[0]

    outstanding, high = [0], [0]
    real_iter, real_write = shard_module.iter_shard_samples, Writer.write

    def counting_iter(uri, **kw):
        for s in real_iter(uri, **kw):
            outstanding[0] += 1
            high[0] = max(high[0], outstanding[0])
            yield s

    def counting_write(self, sample):
        outstanding[0] -= 1
        return real_write(self, sample)

    monkeypatch.setattr(shard_module, "iter_shard_samples", counting_iter)
    monkeypatch.setattr(Writer, "write", counting_write)
    rewritten = shard_module._rewrite_without(str(part), info, {"k1", "k4"})
    assert high[0] <= 3  # the sample in hand and the two dropped ones (never written): not all 6 at once
    assert rewritten.name == "shard-000.tar" and rewritten.samples == 4
    kept = [s["__key__"] for s in real_iter(str(part / "shard-000.tar"))]
    assert kept == ["k0", "k2", "k3", "k5"]
    assert shard_module._rewrite_without(str(part), rewritten, {"k0", "k2", "k3", "k5"}) is None
    assert not (part / "shard-000.tar").exists()
