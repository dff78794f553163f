"""The shard stage against a real S3 server (SeaweedFS on 127.0.0.1): S3 sources, S3 outputs, verify,
clear errors for unknown buckets and bad credentials, and a run killed mid-upload."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep import sources, storage
from data_prep.dataset import INDEX_NAME, read_dataset, verify_dataset
from data_prep.errors import DataPrepError
from data_prep.shard import ShardConfig, build_shards
from tests.data_prep.inputs import kill_cli_when, write_folder

ROOT = Path(__file__).resolve().parents[2]


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())


def keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_s3_prefix_of_images_to_s3_shards(tmp_path, s3_bucket, s3_env):
    write_folder(tmp_path / "raw", 14)
    (tmp_path / "raw" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "raw" / "broken.txt").write_text("three bytes of a jpeg")
    client = s3_env.client()
    upload_folder(client, tmp_path / "raw", s3_bucket, "raw")
    out = f"s3://{s3_bucket}/datasets/photos"

    report = build_shards(ShardConfig(source=f"s3://{s3_bucket}/raw", output=out, resolution=32,
                                      samples_per_shard=4, processes=2, progress=False))
    assert report.written == 14 and report.skipped == {"corrupt_image": 1}
    dataset = read_dataset(out)
    assert dataset.total_samples == 14 and all(s.uri.startswith(f"s3://{s3_bucket}/") for s in dataset.shards)
    verified = verify_dataset(out)
    assert verified.ok and verified.orphans == []
    # Only published names in the bucket: the index, one part's manifest, sample list and digests, its shards.
    listed = keys(client, s3_bucket, "datasets/photos/")
    assert len(listed) == 4 + len(dataset.shards) and not any("tmp" in k for k in listed)
    # The same items from a local folder are the same dataset.
    local = build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "local"), resolution=32,
                                     samples_per_shard=4, processes=1, progress=False))
    assert local.content_id == report.content_id

    # An incremental run over the grown S3 prefix adds one part with just the new items.
    write_folder(tmp_path / "more", 3, start=100)
    upload_folder(client, tmp_path / "more", s3_bucket, "raw")
    second = build_shards(ShardConfig(source=f"s3://{s3_bucket}/raw", output=out, resolution=32,
                                      samples_per_shard=4, processes=2, progress=False))
    assert second.written == 3 and second.existing == 14 and len(read_dataset(out).parts) == 2


def test_cli_shards_to_s3_verify_and_stream(tmp_path, s3_bucket, s3_env, capsys):
    from pipelines.cli import main
    from training.loader.stream import ShardStream

    write_folder(tmp_path / "raw", 10)
    out = f"s3://{s3_bucket}/ds"
    assert main(["shard", "--source", str(tmp_path / "raw"), "--output", out, "--resolution", "32",
                 "--samples-per-shard", "4", "--no-progress"]) == 0
    assert "10 samples" in capsys.readouterr().out
    assert main(["shard", "verify", out]) == 0
    assert "ok, 3 shards and 10 samples" in capsys.readouterr().out

    stream = iter(ShardStream(out, rank=0, world_size=1, batch_size=5, resolution=32, seed=0, shuffle_buffer=4))
    batches = [next(stream) for _ in range(2)]
    assert [tuple(b.pixels.shape) for b in batches] == [(5, 3, 32, 32)] * 2
    assert len({k for b in batches for k in b.keys}) == 10

    # A shard changed behind the manifest's back is reported, with a non-zero exit.
    shard = read_dataset(out).shards[0]
    bucket, key = shard.uri[len("s3://"):].split("/", 1)
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=b"not the shard the manifest promised")
    assert main(["shard", "verify", out]) == 1
    assert f"MISMATCH {shard.name}" in capsys.readouterr().out


def test_unknown_bucket_and_bad_credentials_stop_before_any_work(tmp_path, s3_bucket, s3_env, monkeypatch, capsys):
    from pipelines.cli import main

    write_folder(tmp_path / "raw", 2)
    with pytest.raises(DataPrepError, match="no-such-bucket-here.*does not exist"):
        build_shards(ShardConfig(source=str(tmp_path / "raw"), output="s3://no-such-bucket-here/ds", progress=False))
    with pytest.raises(DataPrepError, match="no-such-bucket-here"):
        build_shards(ShardConfig(source="s3://no-such-bucket-here/raw", output=str(tmp_path / "out"),
                                 progress=False))
    assert not (tmp_path / "out").exists()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.reset_clients()
    code = main(["shard", "--source", str(tmp_path / "raw"), "--output", f"s3://{s3_bucket}/ds", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "credentials" in err and len(err.splitlines()) == 1
    storage.reset_clients()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    assert keys(s3_env.client(), s3_bucket, "") == []


def test_run_killed_mid_upload_leaves_the_dataset_as_it_was(tmp_path, s3_bucket, s3_env):
    out = f"s3://{s3_bucket}/ds"
    write_folder(tmp_path / "raw", 6)
    first = build_shards(ShardConfig(source=str(tmp_path / "raw"), output=out, resolution=32, samples_per_shard=3,
                                     processes=1, progress=False))
    client = s3_env.client()
    index_before = client.get_object(Bucket=s3_bucket, Key=f"ds/{INDEX_NAME}")["Body"].read()
    write_folder(tmp_path / "raw", 120, start=6, size=(512, 512))
    kill_cli_when(["shard", "--source", str(tmp_path / "raw"), "--output", out, "--resolution", "32",
                   "--samples-per-shard", "3", "--processes", "1", "--no-progress"], ROOT,
                  lambda: len([k for k in keys(client, s3_bucket, "ds/part-")
                               if not k.startswith(f"ds/{first.part}/")]) >= 2)

    assert client.get_object(Bucket=s3_bucket, Key=f"ds/{INDEX_NAME}")["Body"].read() == index_before
    assert read_dataset(out).total_samples == 6
    assert verify_dataset(out).orphans  # uploaded shards of the killed run, listed by nothing

    report = build_shards(ShardConfig(source=str(tmp_path / "raw"), output=out, resolution=32, samples_per_shard=3,
                                      processes=2, progress=False))
    assert report.written == 120 and report.existing == 6
    final = verify_dataset(out)
    assert final.ok and final.orphans == [] and final.samples == 126


def test_listed_s3_keys_are_read_exactly():
    """A folder on S3 is read by the keys its listing returned. On AWS S3 "raw//a.png" is an object of
    its own beside "raw/a.png"; re-joined from its name it lost a slash, so it read the other object or
    became a `missing_image` skip though it exists."""
    listed = ["raw//a.png", "raw//a.txt", "raw/a.png", "raw/a.txt", "raw/b//c.png", "raw/b//c.txt", "raw//d.png"]
    # As S3Storage.list gives them for these keys under s3://bk/raw: the URI of each key, the name after "raw/".
    listing = [storage.ObjectInfo(uri=f"s3://bk/{key}", name=key[len("raw/"):], size=1) for key in listed]
    plan = sources._plan_folder("s3://bk/raw", listing)
    read = sorted((storage._split_s3(i.image)[1], storage._split_s3(i.caption_uri or "")[1]) for i in plan.items)
    assert read == [("raw//a.png", "raw//a.txt"), ("raw/a.png", "raw/a.txt"), ("raw/b//c.png", "raw/b//c.txt")]
    assert len({i.source_id for i in plan.items}) == 3
    assert [(s.source_id, s.reason) for s in plan.skips] == [("/d.png", "missing_caption")]


def test_s3_keys_with_double_slashes_are_sharded(tmp_path, s3_bucket, s3_env):
    """A folder and a folder of shards on the real S3 server, put under keys with "//": every object is
    read by the key it was listed under, and nothing is skipped. SeaweedFS (a filer: keys are paths)
    stores "raw//a.jpg" as "raw/a.jpg" and lists it so; AWS S3 keeps such keys, which
    test_listed_s3_keys_are_read_exactly and test_s3_uris_name_keys_exactly cover."""
    names = write_folder(tmp_path / "raw", 4)
    client = s3_env.client()
    for i, name in enumerate(names):
        folder = "raw//" if i % 2 else "raw/sub//"
        for file in (name, name.replace(".jpg", ".txt")):
            client.put_object(Bucket=s3_bucket, Key=folder + file, Body=(tmp_path / "raw" / file).read_bytes())
    store = storage.storage_for(f"s3://{s3_bucket}")
    gets: list[str] = []

    def record(params: dict, **_: object) -> None:
        gets.append(params["Key"])

    events = store.client().meta.events
    events.register("before-parameter-build.s3.GetObject", record)
    try:
        out = tmp_path / "ds"
        report = build_shards(ShardConfig(source=f"s3://{s3_bucket}/raw", output=str(out), resolution=32,
                                          processes=1, progress=False))
        assert report.written == 4 and report.skipped == {}
        assert sorted(gets) == keys(client, s3_bucket, "raw/")  # images and captions, each once, as listed
        shard = read_dataset(str(out)).shards[0]
        client.put_object(Bucket=s3_bucket, Key="old//" + Path(shard.uri).name, Body=Path(shard.uri).read_bytes())
        gets.clear()
        again = build_shards(ShardConfig(source=f"s3://{s3_bucket}/old", output=str(tmp_path / "again"),
                                         resolution=32, processes=1, progress=False))
        assert again.written == 4 and again.skipped == {} and gets == keys(client, s3_bucket, "old/")
    finally:
        events.unregister("before-parameter-build.s3.GetObject", record)
