"""The shard stage end to end on real local files: parts, manifests, index, identity, incremental runs,
de-duplication, byte limits, parallel processes, and what a killed run leaves behind."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from data_prep.dataset import INDEX_NAME, read_dataset, read_samples, verify_dataset
from data_prep.errors import DataPrepError
from data_prep.shard import ShardConfig, build_shards
from data_prep.shard_writer import TAR_MTIME
from data_prep.sources import key_for
from tests.data_prep.inputs import cli_without_root_powers, jpeg_bytes, kill_cli_when, write_folder

ROOT = Path(__file__).resolve().parents[2]


def config(source, output, **kw) -> ShardConfig:
    kw.setdefault("resolution", 32)
    kw.setdefault("samples_per_shard", 8)
    kw.setdefault("processes", 1)
    kw.setdefault("progress", False)
    return ShardConfig(source=str(source), output=str(output), **kw)


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_folder_becomes_a_verified_part_with_index(tmp_path):
    names = write_folder(tmp_path / "src", 20)
    out = tmp_path / "out"
    seen: list[int] = []
    report = build_shards(config(tmp_path / "src", out), progress=seen.append)
    assert sum(seen) == 20  # every item reported to the progress callback once

    assert report.written == 20 and report.skipped == {} and report.existing == 0
    dataset = read_dataset(str(out))
    assert len(dataset.parts) == 1 and dataset.parts[0].name == report.part
    assert [s.samples for s in dataset.shards] == [8, 8, 4]
    assert dataset.total_samples == 20 and dataset.content_id == report.content_id
    assert dataset.options["resolution"] == 32
    verified = verify_dataset(str(out))
    assert verified.ok and verified.orphans == [] and verified.samples == 20
    # Nothing but the index, the part's manifest, its sample list, its digests and its shards; no temp files.
    part = report.part
    assert all_files(out) == sorted([INDEX_NAME, f"{part}/manifest.json", f"{part}/samples.jsonl.gz",
                                     f"{part}/digests.bin"]
                                    + [s.name for s in dataset.shards])

    keys = set()
    for shard in dataset.shards:
        members = tar_members(out / shard.name)
        # Fixed header fields, not the clock or the user: the precondition for byte-identical rebuilds.
        fields = {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members}
        assert fields == {(TAR_MTIME, 0, 0, "", "", 0o644)}
        with tarfile.open(out / shard.name) as tar:
            for m in members:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    key = m.name.split(".")[0]
                    assert key == key_for(meta["source_id"], meta["sha256"]) and meta["source_id"] in names
                    assert meta["processed_size"] == [32, 32] and meta["original_size"] == [96, 80]
                    assert len(meta["sha256"]) == 64 and "aspect_bucket" in meta
                    keys.add(key)
    assert len(keys) == 20
    manifest = dataset.parts[0].manifest
    assert manifest.stats["written"] == 20 and manifest.stats["duration_s"] > 0
    assert len(read_samples(dataset.parts[0].uri, manifest)) == 20


def test_identity_ignores_time_folder_and_process_count(tmp_path):
    write_folder(tmp_path / "src", 24)
    one = build_shards(config(tmp_path / "src", tmp_path / "a", processes=1))
    two = build_shards(config(tmp_path / "src", tmp_path / "b", processes=2))
    again = build_shards(config(tmp_path / "src", tmp_path / "c", processes=1))
    assert one.content_id == two.content_id == again.content_id
    # Same process count: byte-identical shards under the same names.
    a, c = read_dataset(str(tmp_path / "a")), read_dataset(str(tmp_path / "c"))
    assert [(s.name.split("/")[1], s.sha256) for s in a.shards] == [(s.name.split("/")[1], s.sha256) for s in c.shards]
    # Any processing option changes the identity.
    other = build_shards(config(tmp_path / "src", tmp_path / "d", quality=80))
    assert other.content_id != one.content_id


def test_parallel_processes_split_work_and_find_cross_task_duplicates(tmp_path):
    src = tmp_path / "src"
    write_folder(src, 40)
    # The same bytes under three names, far apart in input order: different tasks with 2 processes.
    dup = jpeg_bytes(seed=12345)
    for name in ("aaa-first.jpg", "mmm-second.jpg", "zzz-third.jpg"):
        (src / name).write_bytes(dup)
        (src / name.replace(".jpg", ".txt")).write_text("the same picture")
    report = build_shards(config(src, tmp_path / "out", processes=2))
    assert report.written == 41 and report.skipped == {"duplicate": 2}
    dataset = read_dataset(str(tmp_path / "out"))
    assert len(dataset.shards) > 2  # cut into several tasks for the two workers
    records = read_samples(dataset.parts[0].uri, dataset.parts[0].manifest)
    assert len({r.sha256 for r in records}) == len(records) == 41
    assert "aaa-first.jpg" in {r.source_id for r in records}  # the first in input order is kept
    assert verify_dataset(str(tmp_path / "out")).ok  # the rewritten shard matches its manifest


def test_byte_limit_splits_shards(tmp_path):
    write_folder(tmp_path / "src", 30, size=(300, 300))
    report = build_shards(config(tmp_path / "src", tmp_path / "out", resolution=256, image_format="png",
                                 samples_per_shard=1000, max_shard_bytes=1 << 20))
    dataset = read_dataset(str(tmp_path / "out"))
    assert report.written == 30 and len(dataset.shards) >= 2
    assert all(s.bytes <= 1 << 20 for s in dataset.shards)
    assert all(os.path.getsize(tmp_path / "out" / s.name) == s.bytes for s in dataset.shards)


def test_incremental_runs_add_only_new_items(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src, 12)
    first = build_shards(config(src, out))
    write_folder(src, 5, start=12)
    (src / "zz-copy-of-3.jpg").write_bytes((src / "img-0003.jpg").read_bytes())  # old bytes, new name
    (src / "zz-copy-of-3.txt").write_text("a copy")
    second = build_shards(config(src, out))

    # The copy's bytes are already in the dataset, whatever its name: existing, not a new item.
    assert second.part != first.part and second.written == 5 and second.existing == 13
    assert second.skipped == {}
    dataset = read_dataset(str(out))
    assert [p.name for p in dataset.parts] == [first.part, second.part]
    assert dataset.total_samples == 17 == second.dataset_samples
    # The same items built in one go give the same identity as built in two parts.
    assert build_shards(config(src, tmp_path / "at-once")).content_id == dataset.content_id

    index_before = (out / INDEX_NAME).read_bytes()
    third = build_shards(config(src, out))
    assert third.nothing_new and third.written == 0 and third.existing == 18
    assert (out / INDEX_NAME).read_bytes() == index_before
    assert len(read_dataset(str(out)).parts) == 2


def test_changed_options_need_overwrite_which_never_reuses_names(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src, 10)
    first = build_shards(config(src, out))
    with pytest.raises(DataPrepError, match=r"resolution=32.*--overwrite"):
        build_shards(config(src, out, resolution=48))
    old_names = {s.name for s in read_dataset(str(out)).shards}
    second = build_shards(config(src, out, resolution=48, overwrite=True))
    dataset = read_dataset(str(out))
    assert [p.name for p in dataset.parts] == [second.part] and second.part != first.part
    assert not old_names & {s.name for s in dataset.shards}  # a reader of the old manifest never gets new bytes
    assert not (out / first.part).exists()
    assert dataset.options["resolution"] == 48 and dataset.total_samples == 10


def test_bad_input_as_a_whole_stops_before_any_work(tmp_path):
    with pytest.raises(DataPrepError, match="does not exist"):
        build_shards(config(tmp_path / "missing", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    write_folder(tmp_path / "src", 2)
    (tmp_path / "file").write_text("I am a file")
    with pytest.raises(DataPrepError, match="file"):
        build_shards(config(tmp_path / "src", tmp_path / "file" / "out"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "junk" / "a.txt").write_text("caption")
    with pytest.raises(DataPrepError, match="no usable images"):
        build_shards(config(tmp_path / "junk", tmp_path / "out2"))
    assert not any(p.suffix == ".tar" for p in (tmp_path / "out2").rglob("*"))
    with pytest.raises(DataPrepError, match="`quality` must be"):
        config(tmp_path / "src", tmp_path / "out3", quality=101)


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    write_folder(tmp_path / "src", 2)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = cli_without_root_powers(["shard", "--source", str(tmp_path / "src"), "--output", str(locked / "out"),
                                    "--no-progress"], cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert str(locked) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (locked / "out").exists()


def test_killed_run_leaves_nothing_visible_and_the_next_run_completes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src, 10)
    first = build_shards(config(src, out))
    index_before = (out / INDEX_NAME).read_bytes()
    write_folder(src, 150, start=10, size=(512, 512))
    # Killed once the new part has published a shard or two.
    kill_cli_when(["shard", "--source", str(src), "--output", str(out), "--resolution", "32", "--samples-per-shard",
                   "4", "--processes", "1", "--no-progress"], ROOT,
                  lambda: len([p for p in out.glob("part-*/shard-*.tar") if first.part not in str(p)]) >= 2)

    # Readers see exactly the dataset before the run: the new shards are in a part no index lists.
    assert (out / INDEX_NAME).read_bytes() == index_before
    assert read_dataset(str(out)).total_samples == 10
    leftovers = verify_dataset(str(out))
    assert leftovers.ok and leftovers.orphans and all(o.startswith("part-") for o in leftovers.orphans)

    report = build_shards(config(src, out, samples_per_shard=4))
    assert report.written == 150 and report.existing == 10
    final = verify_dataset(str(out))
    assert final.ok and final.orphans == [] and final.samples == 160


def test_verify_cli_reports_mismatches(tmp_path, capsys):
    from pipelines.cli import main

    write_folder(tmp_path / "src", 12)
    build_shards(config(tmp_path / "src", tmp_path / "out"))
    assert main(["shard", "verify", str(tmp_path / "out")]) == 0
    assert "ok, 2 shards and 12 samples" in capsys.readouterr().out

    shards = read_dataset(str(tmp_path / "out")).shards
    first = tmp_path / "out" / shards[0].name
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF  # one flipped bit inside the first member's data
    first.write_bytes(bytes(data))
    (tmp_path / "out" / shards[1].name).unlink()
    assert main(["shard", "verify", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {shards[0].name}: sha256" in out and f"MISMATCH {shards[1].name}: missing" in out


def test_shard_cli_prints_a_summary_and_says_when_nothing_is_new(tmp_path, capsys):
    from pipelines.cli import main

    write_folder(tmp_path / "src", 6)
    (tmp_path / "src" / "bad.jpg").write_bytes(b"")
    (tmp_path / "src" / "bad.txt").write_text("empty image")
    args = ["shard", "--source", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--resolution", "32",
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "written" in out and "6 samples" in out and "empty_file" in out and "samples/s" in out
    assert main(args) == 0
    assert "nothing new" in capsys.readouterr().out


def test_read_capped_files_and_streams(tmp_path):
    import io

    from data_prep.shard_task import read_capped

    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    with open(path, "rb") as f:
        assert read_capped(f, 1000) == b"x" * 1000
    with open(path, "rb") as f:
        assert read_capped(f, 999) is None
    # A stream (as from S3) without a size: read in chunks, stopped just past the cap.
    stream = io.BufferedReader(io.BytesIO(b"y" * 700_000))
    assert read_capped(stream, 700_000) == b"y" * 700_000
    stream = io.BufferedReader(io.BytesIO(b"y" * 700_000))
    assert read_capped(stream, 300_000) is None and stream.tell() <= 300_001 + 256 * 1024
