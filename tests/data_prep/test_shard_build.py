"""The shard stage end to end on real files: shards, manifest, skips, overwrite, failure atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

import data_prep.shard
import data_prep.sources
from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST_NAME, read_manifest, verify_shards
from data_prep.shard import ShardConfig, build_shards
from data_prep.shard_writer import TAR_MTIME
from data_prep.sources import key_for
from data_prep.synth import generate_synthetic

N_GOOD = 30


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """30 good synthetic images plus one of each kind of bad item."""
    root = tmp_path_factory.mktemp("source")
    generate_synthetic(root, N_GOOD, seed=7, image_size=48)
    (root / "bad").mkdir()
    (root / "bad" / "corrupt.png").write_bytes(bytes(range(256)) * 8)
    (root / "bad" / "corrupt.txt").write_text("random bytes")
    png = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes((i * 31) % 256 for i in range(64 * 64 * 3))).save(png, format="PNG")
    (root / "bad" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "bad" / "truncated.txt").write_text("half a picture")
    (root / "bad" / "uncaptioned.png").write_bytes(png.getvalue())
    (root / "bad" / "empty.png").write_bytes(png.getvalue())
    (root / "bad" / "empty.txt").write_text("  \n")
    return root


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_build_writes_verified_shards_and_manifest(source, tmp_path):
    out = tmp_path / "shards"
    seen: list[int] = []
    manifest = build_shards(ShardConfig(source=str(source), output=str(out), resolution=32, samples_per_shard=8),
                            progress=seen.append)

    assert [s.name for s in manifest.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s.samples for s in manifest.shards] == [8, 8, 8, 6]
    assert manifest.total_samples == N_GOOD
    assert manifest.total_bytes == sum((out / s.name).stat().st_size for s in manifest.shards)
    assert manifest.skipped == {"decode_error": 2, "empty_caption": 1, "missing_caption": 1}
    assert manifest.config["resolution"] == 32 and manifest.config["source"] == str(source)
    assert seen == list(range(1, N_GOOD + 4 + 1))  # every source item reported once, skips included
    assert read_manifest(out) == manifest
    verify_shards(out, manifest)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME] + [s.name for s in manifest.shards]

    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()]
    metadata = {row["key"]: row for row in rows}
    keys: set[str] = set()
    for shard in manifest.shards:
        members = _members(out / shard.name)
        # Fixed header fields, not the clock or the user: the precondition for byte-identical rebuilds.
        assert all((m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (TAR_MTIME, 0, 0, "", "", 0o644)
                   for m in members)
        names = [m.name for m in members]
        shard_keys = sorted({n.split(".")[0] for n in names})
        assert sorted(names) == sorted(f"{k}.{e}" for k in shard_keys for e in ("jpg", "json", "txt"))
        keys |= set(shard_keys)
        with tarfile.open(out / shard.name) as tar:
            for key in shard_keys:
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                source_id = meta["source_id"]
                assert key == key_for(source_id)
                raw = (source / source_id).read_bytes()
                assert meta["sha256"] == hashlib.sha256(raw).hexdigest()
                assert meta["original_size"] == [48, 48] and meta["processed_size"] == [32, 32]
                caption = tar.extractfile(f"{key}.txt").read().decode("utf-8")
                assert caption == metadata[Path(source_id).stem]["caption"]
                with Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())) as im:
                    assert im.format == "JPEG" and im.size == (32, 32)
    assert len(keys) == N_GOOD


def test_webdataset_reads_the_shards_as_whole_samples(source, tmp_path):
    out = tmp_path / "shards"
    manifest = build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=8, image_format="png"))
    urls = [str(out / s.name) for s in manifest.shards]
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert len(samples) == N_GOOD
    assert all({"png", "txt", "json"} <= set(s) for s in samples)


def test_identical_input_gives_byte_identical_shards(source, tmp_path):
    a = build_shards(ShardConfig(source=str(source), output=str(tmp_path / "a"), samples_per_shard=8))
    b = build_shards(ShardConfig(source=str(source), output=str(tmp_path / "b"), samples_per_shard=8))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    for s in a.shards:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()


def test_missing_source_fails_before_creating_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match="does not exist"):
        build_shards(ShardConfig(source=str(tmp_path / "nope"), output=str(out)))
    assert not out.exists()


def test_existing_dataset_needs_overwrite_and_overwrite_replaces_it(source, tmp_path):
    out = tmp_path / "out"
    first = build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=4))
    assert len(first.shards) == 8
    with pytest.raises(DataPrepError, match="--overwrite"):
        build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=16))
    assert read_manifest(out) == first  # the refused run changed nothing

    second = build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=16, overwrite=True))
    assert [s.samples for s in second.shards] == [16, 14]
    # The old, higher-numbered shards are gone, not left beside the new set.
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "shard-000000.tar", "shard-000001.tar"]
    verify_shards(out, read_manifest(out))
    assert _leftovers(out) == []


def _fail_on_call(monkeypatch, n: int) -> list[int]:
    """Make the n-th encode_image call in the shard stage raise; returns a one-item call counter."""
    real_encode = data_prep.shard.encode_image
    calls = [0]

    def failing_encode(img, fmt, quality):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("disk on fire")
        return real_encode(img, fmt, quality)

    monkeypatch.setattr(data_prep.shard, "encode_image", failing_encode)
    return calls


def test_failure_mid_write_leaves_no_manifest_and_no_partial_files(source, tmp_path, monkeypatch):
    calls = _fail_on_call(monkeypatch, 10)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=8))
    assert calls == [10]  # one shard was complete and a second in progress when it failed
    assert list(out.iterdir()) == []
    with pytest.raises(DataPrepError, match="no manifest.json"):
        read_manifest(out)


def test_failed_overwrite_leaves_no_dataset_rather_than_the_old_one(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=8))
    _fail_on_call(monkeypatch, 10)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=8, overwrite=True))
    # The old manifest went first: no reader may trust it once its shards are being replaced.
    assert list(out.iterdir()) == []


def test_leftovers_of_an_unpublished_run_are_cleared(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000099.tar").write_bytes(b"stale")
    (out / ".shard-000000.tar.tmp").write_bytes(b"half")
    (out / "notes.md").write_text("not ours: kept")
    manifest = build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=16))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "notes.md"] + [s.name for s in manifest.shards]


def test_source_with_no_usable_images_writes_no_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"not an image")
    (src / "a.txt").write_text("caption")
    (src / "b.png").write_bytes(b"uncaptioned")
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match=r"no usable images .*decode_error=1, missing_caption=1"):
        build_shards(ShardConfig(source=str(src), output=str(out)))
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("resolution", 4, "`resolution` must be an integer in 8..4096"),
        ("resolution", 5000, "`resolution` must be an integer in 8..4096"),
        ("samples_per_shard", 0, "`samples_per_shard` must be an integer >= 1"),
        ("image_format", "gif", "`image_format` must be one of jpg, png, webp"),
        ("quality", 0, "`quality` must be an integer in 1..100"),
        ("quality", True, "`quality` must be an integer in 1..100"),
    ],
)
def test_config_validation_names_field_and_allowed_values(field, value, message):
    with pytest.raises(DataPrepError, match=message.replace(".", r"\.")):
        ShardConfig(source="s", output="o", **{field: value})


def test_duplicate_keys_stop_the_run(source, tmp_path, monkeypatch):
    # Force a key collision (a real one needs ~2^32 items): it must raise, not drop samples silently.
    monkeypatch.setattr(data_prep.sources, "key_for", lambda source_id: "samekey")
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match="duplicate shard key samekey"):
        build_shards(ShardConfig(source=str(source), output=str(out), samples_per_shard=8))
    assert list(out.iterdir()) == []
