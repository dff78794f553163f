"""One junk corpus with every kind of bad item the issue names, sharded in one run: the run exits 0,
writes every good item, and counts each bad one under its own reason."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from data_prep.dataset import read_dataset, read_samples, verify_dataset
from tests.data_prep.inputs import (
    bomb_png,
    cli_without_root_powers,
    closed_port,
    corrupt_jpeg,
    jpeg_bytes,
    png_bytes,
    write_folder,
)

ROOT = Path(__file__).resolve().parents[2]
GOOD = 12


def test_junk_corpus_in_one_run(tmp_path, http_server):
    files = tmp_path / "files"
    files.mkdir()
    rows: list[tuple[str, bytes | str]] = []  # (path or URL, caption as written to the CSV)
    for i in range(GOOD - 2):
        (files / f"good-{i}.jpg").write_bytes(jpeg_bytes(seed=i))
        rows.append((f"files/good-{i}.jpg", f"good photo {i}"))
    (http_server.root / "remote.jpg").write_bytes(jpeg_bytes(seed=500))
    rows.append((f"{http_server.base}/remote.jpg", "a photo served over HTTP"))
    (files / "palette.png").write_bytes(png_bytes(seed=7))
    rows.append(("files/palette.png", "a png"))

    bad = {
        "corrupt_image": ("corrupt.jpg", corrupt_jpeg()),
        "truncated_image": ("truncated.png", png_bytes((128, 128), seed=3)[:3000]),
        "empty_file": ("empty.jpg", b""),
        "not_an_image": ("notes.jpg", b"these are my holiday notes, not a picture\n" * 20),
        "too_many_pixels": ("bomb.png", bomb_png(50000, 50000)),
        "unreadable_file": ("secret.jpg", jpeg_bytes(seed=1000)),
    }
    for reason, (name, data) in bad.items():
        (files / name).write_bytes(data)
        rows.append((f"files/{name}", f"bad item: {reason}"))
    (files / "secret.jpg").chmod(0o000)
    (files / "uncaptioned.jpg").write_bytes(jpeg_bytes(seed=2000))
    rows.append(("files/uncaptioned.jpg", ""))  # missing caption
    (files / "latin1.jpg").write_bytes(jpeg_bytes(seed=2001))
    rows.append(("files/latin1.jpg", "caf\xe9 au lait".encode("latin-1")))  # not UTF-8
    (files / "again.jpg").write_bytes(jpeg_bytes(seed=0))  # same bytes as good-0.jpg
    rows.append(("files/again.jpg", "a duplicate"))
    rows.append((f"http://127.0.0.1:{closed_port()}/gone.jpg", "an unreachable URL"))
    rows.append((f"{http_server.base}/html/login", "a URL that returns HTML"))
    rows.append(("file:///etc/hostname", "a file outside the table's folder"))
    rows.append(("files/../../outside.jpg", "a relative path that climbs out"))

    table = tmp_path / "corpus.csv"
    with open(table, "wb") as f:
        f.write(b"url,caption\n")
        for ref, caption in rows:
            cap = caption if isinstance(caption, bytes) else caption.encode("utf-8")
            f.write(ref.encode() + b',"' + cap + b'"\n')
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)

    # Run as the CLI would be run, in a child process that obeys file permissions even as root.
    proc = cli_without_root_powers(["shard", "--source", str(table), "--output", str(out), "--resolution", "32",
                                    "--samples-per-shard", "5", "--processes", "2", "--fetch-timeout", "2",
                                    "--fetch-retries", "1", "--no-progress",
                                    "--allow-private-hosts"], cwd=ROOT)  # the test server is on 127.0.0.1
    assert proc.returncode == 0, proc.stderr
    dataset = read_dataset(str(out))
    manifest = dataset.parts[0].manifest
    assert manifest.skipped == {
        "caption_not_utf8": 1, "corrupt_image": 1, "duplicate": 1, "empty_file": 1, "fetch_failed": 1,
        "missing_caption": 1, "not_an_image": 1, "not_image_content": 1, "too_many_pixels": 1,
        "truncated_image": 1, "unreadable_file": 1, "outside_allowed_root": 2,
    }
    assert dataset.total_samples == GOOD
    written = {r.source_id for r in read_samples(dataset.parts[0].uri, manifest)}
    assert written == {ref for ref, caption in rows[:GOOD]}
    assert verify_dataset(str(out)).ok
    assert manifest.stats["written"] == GOOD
    for reason in manifest.skipped:
        assert reason in proc.stdout  # the summary table names every reason
    assert "Traceback" not in proc.stderr


def test_folder_captions_sidecars_and_clean_up(tmp_path):
    from data_prep.shard import ShardConfig, build_shards

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (src / "a.txt").write_text("  a   red\n\tcircle\u00a0on blue \n", encoding="utf-8")
    (src / "b.jpg").write_bytes(jpeg_bytes(seed=2))
    (src / "b.json").write_text(json.dumps({"caption": "from a json sidecar", "width": 96}))
    (src / "c.jpg").write_bytes(jpeg_bytes(seed=3))
    (src / "c.json").write_text(json.dumps({"title": "no caption field"}))
    (src / "d.jpg").write_bytes(jpeg_bytes(seed=4))
    (src / "d.txt").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    (src / "e.jpg").write_bytes(jpeg_bytes(seed=5))  # no sidecar at all
    (src / "f.jpg").write_bytes(jpeg_bytes(seed=6))
    (src / "f.txt").write_text(" \n\t ")
    (src / ".hidden.jpg").write_bytes(b"tool debris")
    (src / "notes.txt").write_text("not a caption of anything")

    report = build_shards(ShardConfig(source=str(src), output=str(tmp_path / "out"), resolution=32, processes=1,
                                      progress=False))
    assert report.written == 2
    assert report.skipped == {"caption_not_utf8": 1, "empty_caption": 1, "missing_caption": 2, "hidden_path": 1}
    dataset = read_dataset(str(tmp_path / "out"))
    captions = {r.source_id: r.caption for r in read_samples(dataset.parts[0].uri, dataset.parts[0].manifest)}
    assert captions == {"a.jpg": "a red circle on blue", "b.jpg": "from a json sidecar"}

    kept = build_shards(ShardConfig(source=str(src), output=str(tmp_path / "out2"), resolution=32, processes=1,
                                    progress=False, keep_empty_captions=True))
    assert kept.written == 3 and "empty_caption" not in kept.skipped


def test_table_formats_and_columns(tmp_path, http_server):
    import pandas as pd

    from data_prep.errors import DataPrepError
    from data_prep.shard import ShardConfig, build_shards

    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
        rows.append({"image_path": f"imgs/{i}.jpg", "text": f"local {i}"})
    (http_server.root / "r.jpg").write_bytes(jpeg_bytes(seed=99))
    rows.append({"image_path": f"{http_server.base}/r.jpg", "text": "remote"})
    rows.append({"image_path": (tmp_path / "imgs" / "0.jpg").resolve().as_uri(), "text": "file url, same bytes"})
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "t.parquet")

    ids = set()
    for suffix in ("csv", "tsv", "jsonl", "parquet"):
        report = build_shards(ShardConfig(source=str(tmp_path / f"t.{suffix}"), output=str(tmp_path / suffix),
                                          resolution=32, processes=1, progress=False, url_column="image_path",
                                          caption_column="text", allow_private_hosts=True))
        assert report.written == 5 and report.skipped == {"duplicate": 1}, suffix
        ids.add(report.content_id)
    assert len(ids) == 1  # the same rows in any table format are the same dataset
    assert sum(p.endswith("/r.jpg") for p in http_server.requests) == 4

    with open(tmp_path / "plain.csv", "w", newline="") as f:
        csv.writer(f).writerows([["url", "caption"], ["imgs/1.jpg", "default column names"]])
    assert build_shards(ShardConfig(source=str(tmp_path / "plain.csv"), output=str(tmp_path / "plain"),
                                    resolution=32, processes=1, progress=False)).written == 1
    try:
        build_shards(ShardConfig(source=str(tmp_path / "t.csv"), output=str(tmp_path / "x"), resolution=32,
                                 url_column="nope", progress=False))
    except DataPrepError as e:
        assert "no column 'nope'" in str(e) and "image_path" in str(e)
    else:
        raise AssertionError("an unknown column must be refused")


def test_existing_shards_are_resized_and_resharded(tmp_path):
    from data_prep.shard import ShardConfig, build_shards

    write_folder(tmp_path / "src", 14)
    first = build_shards(ShardConfig(source=str(tmp_path / "src"), output=str(tmp_path / "big"), resolution=64,
                                     samples_per_shard=4, processes=1, progress=False))
    again = build_shards(ShardConfig(source=str(tmp_path / "big"), output=str(tmp_path / "small"), resolution=32,
                                     samples_per_shard=10, processes=1, progress=False))
    assert first.written == again.written == 14 and again.skipped == {}
    small = read_dataset(str(tmp_path / "small"))
    assert small.options["resolution"] == 32 and verify_dataset(str(tmp_path / "small")).ok
    captions = sorted(r.caption for r in read_samples(small.parts[0].uri, small.parts[0].manifest))
    assert captions == sorted(f"photo number {i}" for i in range(14))
    rerun = build_shards(ShardConfig(source=str(tmp_path / "big"), output=str(tmp_path / "small"), resolution=32,
                                     samples_per_shard=10, processes=1, progress=False))
    assert rerun.nothing_new and rerun.existing == 14 and rerun.skipped == {}
    # A plain folder of .tar files (no index) is a shards source too.
    plain = tmp_path / "plain"
    plain.mkdir()
    for shard in read_dataset(str(tmp_path / "big")).shards:
        (plain / shard.name.split("/")[-1]).write_bytes(Path(shard.uri).read_bytes())
    assert build_shards(ShardConfig(source=str(plain), output=str(tmp_path / "from-plain"), resolution=32,
                                    processes=2, progress=False)).written == 14


def test_hidden_and_symlinked_folders_are_counted_or_followed(tmp_path):
    """Images under names starting with '.' or '_' and folders behind symlinks used to vanish from a
    run uncounted: now each is a skip with its own reason, or, with follow_symlinks, read (each real
    folder once, so a link cycle ends)."""
    from data_prep.shard import ShardConfig, build_shards

    src = tmp_path / "src"
    write_folder(src, 2)
    write_folder(src / "_drafts", 1, start=10)
    write_folder(src / ".cache", 1, start=20)
    (src / "._img-0000.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")  # macOS debris
    (src / "notes.md").write_text("not an image: ignored")
    elsewhere = tmp_path / "elsewhere"
    write_folder(elsewhere, 3, start=30)
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(src, target_is_directory=True)  # a cycle once links are followed

    report = build_shards(ShardConfig(source=str(src), output=str(tmp_path / "out"), resolution=32, processes=1,
                                      progress=False))
    assert report.written == 2
    assert report.skipped == {"hidden_path": 3, "symlinked_folder": 1}

    followed = build_shards(ShardConfig(source=str(src), output=str(tmp_path / "followed"), resolution=32,
                                        processes=1, progress=False, follow_symlinks=True))
    assert followed.written == 5  # src's own 2 and the 3 behind the link, once despite the loop
    assert followed.skipped == {"hidden_path": 3}


def test_a_url_table_cannot_turn_the_fetcher_on_its_own_network(tmp_path, http_server, monkeypatch):
    """By default a table's URLs may not reach loopback, private or link-local hosts (the cloud
    metadata service), at the first hop or after a redirect, and its paths may not leave the table's
    folder and the allowed roots; each refusal is a counted skip with its own reason."""
    from data_prep.shard import ShardConfig, build_shards

    (http_server.root / "ok.jpg").write_bytes(jpeg_bytes(seed=1))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes(seed=2))
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "b.jpg").write_bytes(jpeg_bytes(seed=3))
    (tmp_path / "tables").mkdir()
    with open(tmp_path / "tables" / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([
            ["url", "caption"],
            [f"{http_server.base}/ok.jpg", "loopback"],
            ["http://169.254.169.254/latest/meta-data/iam/security-credentials/", "metadata service"],
            ["http://[::1]:9/x.jpg", "IPv6 loopback"],
            ["http://10.1.2.3/x.jpg", "RFC 1918"],
            [str(tmp_path / "imgs" / "a.jpg"), "an absolute path outside the table's folder"],
            ["file:///etc/passwd", "a file URL"],
            [(shared / "b.jpg").as_uri(), "under an allowed root"],
        ])
    report = build_shards(ShardConfig(source=str(tmp_path / "tables" / "t.csv"), output=str(tmp_path / "out"),
                                      resolution=32, processes=1, progress=False, allowed_roots=(str(shared),),
                                      fetch_timeout=2.0, fetch_retries=0))
    assert report.written == 1  # only the file under the allowed root
    assert report.skipped == {"private_host": 4, "outside_allowed_root": 2}
    assert not any(p.endswith("/ok.jpg") for p in http_server.requests)  # refused before connecting


def test_a_shard_member_over_the_size_cap_is_not_read(tmp_path, monkeypatch):
    """Re-sharding read every tar member whole, whatever its size (a tar from anyone may hold a
    gigabyte "image"); now one over max_image_bytes is skipped as too_large without being read."""
    import io
    import tarfile

    from data_prep.shard import ShardConfig, build_shards
    from data_prep.sources import OVERSIZED, iter_shard_samples

    shards = tmp_path / "in"
    shards.mkdir()
    small, big = jpeg_bytes(seed=1), jpeg_bytes((600, 600), seed=2)
    with tarfile.open(shards / "a.tar", "w") as tar:
        for key, data in (("s", small), ("b", big)):
            for ext, body in (("jpg", data), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    cap = (len(small) + len(big)) // 2
    samples = list(iter_shard_samples(str(shards / "a.tar"), max_member_bytes=cap))
    assert samples[0]["jpg"] == small and OVERSIZED not in samples[0]
    assert "jpg" not in samples[1] and f"b.jpg ({len(big)} bytes)" in samples[1][OVERSIZED]

    report = build_shards(ShardConfig(source=str(shards), output=str(tmp_path / "out"), resolution=32,
                                      processes=1, progress=False, max_image_bytes=cap))
    assert report.written == 1 and report.skipped == {"too_large": 1}
