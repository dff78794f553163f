"""An item is its source bytes, never its name: new data is never taken for old (issue 12, item 12), and
what a dataset already holds reaches the tasks by reference, not as a pickled set (item 16)."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from pathlib import Path

from data_prep.dataset import (
    DIGESTS_NAME,
    Part,
    SampleRecord,
    read_dataset,
    read_samples,
    verify_dataset,
    write_samples,
)
from data_prep.http_fetch import FetchOptions
from data_prep.image_ops import ProcessOptions
from data_prep.known import digest_files
from data_prep.manifest import SCHEMA_VERSION, Manifest, ShardInfo
from data_prep.shard import build_shards
from data_prep.shard_task import TaskContext
from tests.data_prep.inputs import closed_port, jpeg_bytes, write_folder
from tests.data_prep.test_shard_build import config


def stored_bytes(root: Path) -> bytes:
    """Every byte a reader of the dataset can see: files, tar members, the unzipped samples files."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out.append(path.read_bytes())
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                out += [tar.extractfile(m).read() for m in tar.getmembers()]
        elif path.name.endswith(".gz"):
            out.append(gzip.decompress(path.read_bytes()))
    return b"\n".join(out)


def test_batches_with_the_same_file_names_are_all_kept(tmp_path):
    out = tmp_path / "out"
    write_folder(tmp_path / "batch1", 20, seed=1)
    write_folder(tmp_path / "batch2", 20, seed=2)  # img-0000.jpg .. img-0019.jpg again, other pictures
    first = build_shards(config(tmp_path / "batch1", out))
    second = build_shards(config(tmp_path / "batch2", out))
    assert first.written == 20 and second.written == 20 and second.existing == 0
    dataset = read_dataset(str(out))
    records = [r for p in dataset.parts for r in read_samples(p.uri, p.manifest)]
    assert dataset.total_samples == 40 and len({r.key for r in records}) == 40
    assert len({r.source_id for r in records}) == 20  # same names, distinct keys
    assert verify_dataset(str(out)).ok
    # Either batch again: nothing new, recognised by content.
    again = build_shards(config(tmp_path / "batch1", out))
    assert again.nothing_new and again.existing == 20


def test_an_image_replaced_in_place_is_read_again_and_added(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src, 6)
    build_shards(config(src, out))
    (src / "img-0002.jpg").write_bytes(jpeg_bytes(seed=999))  # same name, new picture
    second = build_shards(config(src, out))
    assert second.written == 1 and second.existing == 5
    dataset = read_dataset(str(out))
    versions = [r for p in dataset.parts for r in read_samples(p.uri, p.manifest) if r.source_id == "img-0002.jpg"]
    # The old version stays (nothing is deleted silently); the new one is added under its own key.
    assert dataset.total_samples == 7 and len({(r.key, r.sha256) for r in versions}) == 2
    assert len({r.key for r in versions}) == 2


def test_a_re_signed_url_is_the_same_item_and_no_signature_is_stored(tmp_path, http_server):
    for i in range(4):
        (http_server.root / f"img-{i}.jpg").write_bytes(jpeg_bytes(seed=i))

    def table(signature: str) -> Path:
        path = tmp_path / f"urls-{len(list(tmp_path.glob('*.csv')))}.csv"
        rows = [f"{http_server.base}/img-{i}.jpg?X-Amz-Signature={signature}{i}&X-Amz-Expires=60,photo {i}"
                for i in range(4)]
        path.write_text("url,caption\n" + "\n".join(rows) + "\n")
        return path

    out = tmp_path / "out"
    first = build_shards(config(table("SECRETaaa"), out, allow_private_hosts=True))
    second = build_shards(config(table("SECRETbbb"), out, allow_private_hosts=True))
    assert first.written == 4 and second.nothing_new and second.existing == 4
    part = read_dataset(str(out)).parts[0]
    assert all("?" not in r.source_id for r in read_samples(part.uri, part.manifest))
    assert b"SECRET" not in stored_bytes(out) and b"X-Amz" not in stored_bytes(out)
    # Asked for, the query is kept (where it names the image rather than signs it).
    kept = build_shards(config(table("SECRETaaa"), tmp_path / "kept", allow_private_hosts=True, keep_url_query=True))
    assert kept.written == 4 and b"X-Amz-Signature=SECRETaaa0" in stored_bytes(tmp_path / "kept")
    # Nor in what the run reports about a URL it could not fetch (errors quote the URL's path and query).
    refused_url = f"http://127.0.0.1:{closed_port()}/a.jpg?Signature=SECRETccc"
    (tmp_path / "refused.csv").write_text(f"url,caption\n{refused_url},p\n")
    refused = build_shards(config(tmp_path / "refused.csv", out, allow_private_hosts=True, fetch_retries=0))
    assert refused.skipped == {"fetch_failed": 1} and "a.jpg" in refused.markdown()
    assert "SECRET" not in refused.markdown()


def _part_with(tmp_path: Path, name: str, shas: list[str]) -> Part:
    """A part as written before digest files existed: a manifest and a samples file, nothing else."""
    uri = str(tmp_path / name)
    os.makedirs(uri)
    records = [SampleRecord(key=f"{i:016x}", sha256=s, source_id=f"img-{i}.jpg", shard="shard-000000-000.tar")
               for i, s in enumerate(shas)]
    samples_name, samples_sha = write_samples(uri, records)
    manifest = Manifest(schema_version=SCHEMA_VERSION, total_samples=len(shas), total_bytes=1,
                        shards=[ShardInfo(name="shard-000000-000.tar", samples=len(shas), bytes=1, sha256="0" * 64)],
                        samples_file=samples_name, samples_sha256=samples_sha)
    return Part(name=name, uri=uri, manifest=manifest)


def test_task_payload_does_not_grow_with_the_dataset_and_lookups_stay_exact(tmp_path):
    import hashlib

    def sha(i: int) -> str:
        return hashlib.sha256(f"image {i}".encode()).hexdigest()

    def payload(known) -> int:
        ctx = TaskContext(part_uri=str(tmp_path / "new"), process=ProcessOptions(), fetch=FetchOptions(),
                          samples_per_shard=1000, max_shard_bytes=None, known=known)
        return len(pickle.dumps(ctx))

    small = digest_files([_part_with(tmp_path, "part-00000-small", [sha(i) for i in range(100)])])
    big_part = _part_with(tmp_path, "part-00000-big", [sha(i) for i in range(10_000)])
    assert not (tmp_path / "part-00000-big" / DIGESTS_NAME).exists()  # an older part: built from its samples
    big = digest_files([big_part])
    assert (tmp_path / "part-00000-big" / DIGESTS_NAME).stat().st_size == 32 * 10_000
    # The same size whatever the number of known samples (only the part's name differs, by 2 characters).
    assert abs(payload(big) - payload(small)) <= 2 and payload(big) < 2000
    # Exact: every known digest found, and no false "already present" among 10k others.
    assert all(sha(i) in big for i in range(10_000))
    assert not any(sha(i) in big for i in range(10_000, 20_000))
    assert sha(99) in small and sha(100) not in small


def test_parts_without_a_digest_file_still_recognise_their_items(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src, 8)
    first = build_shards(config(src, out))
    (out / first.part / DIGESTS_NAME).unlink()  # as written before digest files existed
    write_folder(src, 3, start=8)
    second = build_shards(config(src, out))
    assert second.written == 3 and second.existing == 8
    assert (out / first.part / DIGESTS_NAME).exists() and (out / second.part / DIGESTS_NAME).exists()
    assert verify_dataset(str(out)).orphans == []
