"""The manifest contract: round trip, hash of the file, schema checks, shard verification."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from data_prep.errors import DataPrepError
from data_prep.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    ShardInfo,
    read_manifest,
    verify_shards,
    write_manifest,
)


def _tar(path, keys):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext in ("jpg", "txt"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
    data = path.read_bytes()
    return ShardInfo(name=path.name, samples=len(keys), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _manifest(shards):
    return Manifest(
        schema_version=SCHEMA_VERSION,
        shards=shards,
        total_samples=sum(s.samples for s in shards),
        total_bytes=sum(s.bytes for s in shards),
        skipped={"decode_error": 2},
        config={"resolution": 64},
        created_at="2024-01-01T00:00:00Z",
    )


def test_write_read_round_trip_and_sha256_is_the_file_hash(tmp_path):
    m = _manifest([_tar(tmp_path / "shard-000000.tar", ["a", "b"]), _tar(tmp_path / "shard-000001.tar", ["c"])])
    path = write_manifest(str(tmp_path), m)
    assert path == str(tmp_path / MANIFEST_NAME)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    back = read_manifest(tmp_path)
    assert back == m
    assert back.sha256 == m.sha256 == hashlib.sha256((tmp_path / MANIFEST_NAME).read_bytes()).hexdigest()
    assert Manifest.from_dict(m.to_dict()) == m
    verify_shards(str(tmp_path), back)


@pytest.mark.parametrize("version", [0, 1, "2", None, True])
def test_from_dict_rejects_unknown_schema_version(version):
    d = _manifest([]).to_dict()
    d["schema_version"] = version
    with pytest.raises(DataPrepError, match=f"schema_version must be {SCHEMA_VERSION}"):
        Manifest.from_dict(d)


def test_newer_schema_says_upgrade():
    d = {**_manifest([]).to_dict(), "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(DataPrepError, match="upgrade ldmflow"):
        Manifest.from_dict(d)


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(DataPrepError, match="no manifest.json in .*run `ldmflow shard` first"):
        read_manifest(str(tmp_path))


def test_malformed_manifests_are_rejected(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DataPrepError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    d = _manifest([ShardInfo("shard-000000.tar", 3, 100, "0" * 64)]).to_dict()
    d["total_samples"] = 4
    with pytest.raises(DataPrepError, match="do not match its shard list"):
        Manifest.from_dict(d)
    with pytest.raises(DataPrepError, match="plain file name"):
        ShardInfo("../shard-000000.tar", 1, 1, "0" * 64)


def test_verify_detects_changed_bytes_and_wrong_counts(tmp_path):
    shard = _tar(tmp_path / "shard-000000.tar", ["a", "b", "c"])
    data = bytearray((tmp_path / "shard-000000.tar").read_bytes())
    data[600] ^= 1  # flip a bit inside the first member's data
    (tmp_path / "shard-000000.tar").write_bytes(bytes(data))
    with pytest.raises(DataPrepError, match="sha256"):
        verify_shards(str(tmp_path), _manifest([shard]))

    shard = _tar(tmp_path / "shard-000000.tar", ["a", "b", "c"])
    wrong = ShardInfo(shard.name, 4, shard.bytes, shard.sha256)
    with pytest.raises(DataPrepError, match="3 samples, manifest says 4"):
        verify_shards(str(tmp_path), _manifest([wrong]))

    with pytest.raises(DataPrepError, match="missing"):
        verify_shards(str(tmp_path), _manifest([ShardInfo("shard-000009.tar", 1, 1, "0" * 64)]))


def test_manifest_json_is_plain_json(tmp_path):
    write_manifest(str(tmp_path), _manifest([]))
    d = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert d["schema_version"] == SCHEMA_VERSION and d["skipped"] == {"decode_error": 2}


def test_names_read_from_storage_cannot_reach_outside_the_dataset(tmp_path):
    """index.json's part names and a manifest's samples file are joined to the dataset folder (and a
    part is deleted by --overwrite): a name that leaves it is refused where it is read, and nothing
    outside is read or deleted."""
    import shutil

    from data_prep.dataset import INDEX_NAME, read_dataset
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    generate_synthetic(tmp_path / "raw", 6, seed=1, image_size=32)
    dataset = tmp_path / "dataset"
    config = ShardConfig(source=str(tmp_path / "raw"), output=str(dataset), resolution=32, processes=1,
                         progress=False)
    build_shards(config)
    part = next(dataset.glob("part-*"))
    outside = tmp_path / "outside-part"
    shutil.move(part, outside)  # someone else's data, a valid part, beside the dataset
    index = json.loads((dataset / INDEX_NAME).read_text())
    index["parts"][0]["name"] = "../outside-part"
    (dataset / INDEX_NAME).write_text(json.dumps(index))

    with pytest.raises(DataPrepError, match="a part name must be one plain name"):
        read_dataset(str(dataset))
    with pytest.raises(DataPrepError, match="a part name"):
        build_shards(ShardConfig(**{**config.__dict__, "overwrite": True}))
    assert (outside / "manifest.json").is_file() and list(outside.glob("*.tar"))  # not deleted

    manifest = json.loads((outside / "manifest.json").read_text())
    manifest["samples_file"] = "../../etc/passwd"
    (outside / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataPrepError, match="samples_file"):
        read_manifest(str(outside))
