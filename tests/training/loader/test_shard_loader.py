"""The GPU loader: every sample once per epoch across ranks and loader workers, exact resume without
replay (also from S3 byte offsets), elastic re-split to another world size, counted skips, uint8 batches."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_prep import storage
from data_prep.dataset import read_dataset
from data_prep.shard import ShardConfig, build_shards
from data_prep.synth import generate_synthetic
from training.errors import DataError
from training.loader import stream as shard_loader
from training.loader.batch import to_model_input
from training.loader.plan import LoaderState, StreamState, plan_epoch
from training.loader.stream import ShardStream
from training.loader.tar_reader import ShardReader

SEED = 11
TOTAL = 33


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    generate_synthetic(root / "raw", TOTAL, seed=3, image_size=32)
    return root / "raw"


def make_shards(raw: Path, output: str, per_shard: int) -> str:
    build_shards(ShardConfig(source=str(raw), output=output, resolution=32, samples_per_shard=per_shard,
                             image_format="png", processes=1, progress=False))
    return output


@pytest.fixture(scope="module")
def shards(raw) -> str:
    """Five uneven shards: 7, 7, 7, 7, 5 samples."""
    return make_shards(raw, str(raw.parent / "shards"), 7)


@pytest.fixture(scope="module")
def two_shards(raw) -> str:
    """Two shards (20 and 13 samples): fewer than the ranks of a 3-rank run."""
    return make_shards(raw, str(raw.parent / "two"), 20)


def stream(path, rank, world, *, batch=2, workers=0, buffer=8, state=None, **kwargs) -> ShardStream:
    return ShardStream(str(path), rank=rank, world_size=world, batch_size=batch, resolution=32, seed=SEED,
                       state=state, loader_workers=workers, shuffle_buffer=buffer, **kwargs)


def take(s: ShardStream, n: int) -> list:
    it = iter(s)
    return [next(it) for _ in range(n)]


def keys_of(batches, epoch: int) -> list[str]:
    return [k for b in batches for k, e in zip(b.keys, b.epochs, strict=True) if e == epoch]


def read_through(s: ShardStream, epoch: int) -> list:
    """The batches this rank yields until none of its streams has a sample of `epoch` left."""
    batches = []
    it = iter(s)
    while s.state.epoch <= epoch:
        batches.append(next(it))
        assert batches[-1].pixels.shape[0] == len(batches[-1].keys) == s.cfg.batch_size, "every batch is full"
    for i in s.stream_ids:
        epochs = [e for b in batches if b.stream == i for e in b.epochs]
        assert epochs == sorted(epochs), "a stream yields all of an epoch before any of the next"
    return batches


def piece_sizes(path, streams: int, epoch: int = 0) -> list[int]:
    plan = plan_epoch(read_dataset(path).shards, epoch=epoch, seed=SEED, streams=streams)
    return [sum(seg.end - seg.start for seg in piece) for piece in plan.pieces]


def exactly_once(keys: list[str], total: int = TOTAL) -> bool:
    counts = Counter(keys)
    return len(counts) == total and set(counts.values()) == {1}


# ----------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [2, 3])
def test_every_sample_once_per_epoch_across_ranks_and_loader_workers(shards, world, workers):
    sizes = piece_sizes(shards, world * max(1, workers))
    assert sum(sizes) == TOTAL and max(sizes) - min(sizes) <= 1, "near-equal pieces, nothing dropped"
    ranks = [read_through(stream(shards, rank, world, workers=workers), 0) for rank in range(world)]
    assert exactly_once([k for batches in ranks for k in keys_of(batches, 0)])


def test_fewer_shards_than_ranks(two_shards):
    assert len(read_dataset(two_shards).shards) == 2
    assert exactly_once([k for rank in range(3) for k in keys_of(read_through(stream(two_shards, rank, 3), 0), 0)])


def test_ranks_yield_full_batches_forever(shards):
    # Infinite, always-full streams: every rank can take any number of batches, so collectives never hang.
    for rank in range(3):
        batches = take(stream(shards, rank, 3, batch=4), 12)  # several epochs of an 11-sample piece
        assert all(b.pixels.shape == (4, 3, 32, 32) for b in batches)
        assert batches[-1].epoch >= 3 and all(exactly_once(keys_of(batches, e), 11) for e in range(3))


def test_epochs_reshuffle_but_repeat_exactly_for_same_seed(shards):
    a = take(stream(shards, 0, 1, batch=3), 30)
    assert [b.keys for b in a] == [b.keys for b in take(stream(shards, 0, 1, batch=3), 30)]
    assert exactly_once(keys_of(a, 0)) and exactly_once(keys_of(a, 1)) and keys_of(a, 0) != keys_of(a, 1)
    other = ShardStream(shards, rank=0, world_size=1, batch_size=3, resolution=32, seed=SEED + 1, shuffle_buffer=8)
    assert keys_of(read_through(other, 0), 0) != keys_of(a, 0)


def test_shards_are_read_in_plan_order_and_mixed_by_shards_and_buffer(shards):
    plan = plan_epoch(read_dataset(shards).shards, epoch=0, seed=SEED, streams=1)
    shard_of, in_order = {}, []
    for ref in plan.shards:
        reader = ShardReader(ref.uri, seek=(0, 0), first=0)
        for _ in range(ref.samples):
            key = reader.read()[0]
            shard_of[key] = ref.uri
            in_order.append(key)
        reader.close()

    def same_shard_neighbours(keys):
        return sum(shard_of[a] == shard_of[b] for a, b in zip(keys, keys[1:]))

    plain = keys_of(read_through(stream(shards, 0, 1, buffer=0, mix_shards=1), 0), 0)
    assert plain == in_order  # one shard after another, in the epoch's shuffled order
    mixed = keys_of(read_through(stream(shards, 0, 1, buffer=0), 0), 0)
    buffered = keys_of(read_through(stream(shards, 0, 1, buffer=16), 0), 0)
    assert exactly_once(mixed) and exactly_once(buffered)
    assert same_shard_neighbours(mixed) < same_shard_neighbours(plain) - 10
    assert buffered != mixed and same_shard_neighbours(buffered) < same_shard_neighbours(plain) - 10


# ------------------------------------------------------------------------------------------- resume


def test_resume_continues_with_exactly_the_next_batches(shards):
    s = stream(shards, 1, 2)
    it = iter(s)
    for _ in range(5):
        next(it)
    saved = json.loads(json.dumps(s.state.to_dict()))  # what a checkpoint holds
    expected = [next(it) for _ in range(10)]
    assert keys_of(expected, 1), "crosses into epoch 1 (16-17 samples per piece)"
    resumed = take(stream(shards, 1, 2, state=LoaderState.from_dict(saved)), 10)
    for got, want in zip(resumed, expected, strict=True):
        assert got.keys == want.keys and got.captions == want.captions
        assert torch.equal(got.pixels, want.pixels)


def test_resume_opens_shards_at_saved_bytes_and_decodes_nothing_twice(shards, monkeypatch):
    s = stream(shards, 0, 2)
    take(s, 3)
    saved = LoaderState.from_dict(s.state.to_dict())
    started = [seg for seg in StreamState.from_dict(saved.streams[0]).segments if seg.next > seg.start]
    assert started and all(seg.seek[1] > 0 for seg in started)

    opened, decoded = [], []
    real_open, real_decode = storage.LocalStorage.open_read, shard_loader.decode_sample
    monkeypatch.setattr(storage.LocalStorage, "open_read",
                        lambda self, uri, start=0: opened.append((uri, start)) or real_open(self, uri, start))
    monkeypatch.setattr(shard_loader, "decode_sample",
                        lambda sample, res: decoded.append(sample["__key__"]) or real_decode(sample, res))
    buffered = StreamState.from_dict(saved.streams[0]).buffer
    resumed_at = {(seg.shard, seg.seek[1]) for seg in started} | {(b.shard, b.byte) for b in buffered}
    batch = take(stream(shards, 0, 2, state=saved), 1)[0]
    assert decoded == batch.keys, "only the samples of the new batch are decoded"
    assert opened and {o for o in opened if o[0] in {seg.shard for seg in started}} <= resumed_at


def test_resume_with_loader_workers_ignores_prefetched_batches(shards):
    s = stream(shards, 0, 2, workers=2, prefetch_factor=2)
    it = iter(s)
    consumed = [next(it) for _ in range(3)]  # odd: stream 1 is next, and the workers have run ahead
    assert [b.stream for b in consumed] == [0, 1, 0]
    saved = LoaderState.from_dict(s.state.to_dict())
    expected = [next(it) for _ in range(5)]
    del it
    resumed = take(stream(shards, 0, 2, workers=2, state=saved), 5)
    assert [b.stream for b in resumed] == [1, 0, 1, 0, 1]
    for got, want in zip(resumed, expected, strict=True):
        assert got.keys == want.keys and torch.equal(got.pixels, want.pixels)


def test_state_of_another_layout_needs_every_rank(shards):
    s = stream(shards, 0, 2)
    take(s, 1)
    with pytest.raises(DataError, match="pass every rank's saved state to LoaderState.resplit"):
        stream(shards, 0, 3, state=LoaderState.from_dict(s.state.to_dict()))
    with pytest.raises(DataError, match="version 2"):
        LoaderState.from_dict({"epoch": 1, "consumed": 5, "taken": 4, "skipped": {}})


# ------------------------------------------------------------------------------------------ re-split


@pytest.mark.parametrize(("new_world", "workers"), [(1, 0), (3, 0), (2, 2)])
def test_resplit_to_another_layout_reads_each_sample_once_per_epoch(shards, new_world, workers):
    # Two ranks; rank 0 has run into epoch 1 while rank 1 is early in epoch 0 (as skips can make it).
    old = [stream(shards, r, 2) for r in range(2)]
    before = take(old[0], 12) + take(old[1], 3)
    assert keys_of(before, 1), "rank 0 reached epoch 1"
    saved = [json.loads(json.dumps(s.state.to_dict())) for s in old]  # what the checkpoint holds

    dataset = read_dataset(shards)
    after = []
    for rank in range(new_world):
        state = LoaderState.resplit(saved, world_size=new_world, rank=rank, loader_workers=workers,
                                    dataset=dataset, seed=SEED)
        after += read_through(stream(shards, rank, new_world, workers=workers, state=state), 1)
    for epoch in (0, 1):
        assert exactly_once(keys_of(before + after, epoch)), f"epoch {epoch} read each sample once"

    # Without the dataset, resplit defers to the ShardStream, which re-splits the same way.
    deferred = LoaderState.resplit(saved, world_size=new_world, rank=0, loader_workers=workers)
    stream(shards, 0, new_world, workers=workers, state=deferred)
    assert deferred.streams == LoaderState.resplit(saved, world_size=new_world, rank=0, loader_workers=workers,
                                                   dataset=dataset, seed=SEED).streams


def test_resplit_keeps_counters_and_same_layout_is_unchanged(shards):
    old = [stream(shards, r, 2) for r in range(2)]
    for s in old:
        take(s, 2)
    saved = [s.state.to_dict() for s in old]
    same = LoaderState.resplit(saved, world_size=2, rank=1, loader_workers=0, dataset=read_dataset(shards), seed=SEED)
    assert same.streams == saved[1]["streams"]
    one = LoaderState.resplit(saved, world_size=1, rank=0, loader_workers=0, dataset=read_dataset(shards), seed=SEED)
    assert one.taken == 8 and one.epoch == 0


# ---------------------------------------------------------------------------------------- bad data


def rewrite_shard(path: Path, change) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            data = change(m.name, data)
            if data is None:
                continue
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_undecodable_samples_are_counted_and_batches_stay_full(shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    victim = read_dataset(str(copy)).shards[0]
    pngs = []
    with tarfile.open(copy / victim.name) as tar:
        pngs = [m.name for m in tar.getmembers() if m.name.endswith(".png")]
    # One image corrupt, one missing (its caption stays: the sample is still there, without an image).
    rewrite_shard(copy / victim.name, lambda name, data: b"not a png" if name == pngs[0]
                  else None if name == pngs[1] else data)

    # One rank: exactly the decodable samples of the epoch, each once.
    s = stream(copy, 0, 1)
    assert exactly_once(keys_of(read_through(s, 0), 0), TOTAL - 2)
    assert s.state.skipped == {"UnidentifiedImageError": 1, "missing_image": 1}

    # Two ranks: the rank with the bad samples still yields full batches, as many as the other.
    skipped = Counter()
    for rank in range(2):
        s = stream(copy, rank, 2)
        assert all(b.pixels.shape[0] == 2 for b in take(s, 10))  # 20 samples: past each 16-17 sample piece
        skipped.update(s.state.skipped)
    assert set(skipped) == {"UnidentifiedImageError", "missing_image"} and sum(skipped.values()) >= 2

    # A resume after the skips continues exactly.
    s = stream(copy, 0, 1)
    it = iter(s)
    while sum(s.state.skipped.values()) < 2:
        next(it)
    saved = LoaderState.from_dict(s.state.to_dict())
    assert saved.skipped == {"UnidentifiedImageError": 1, "missing_image": 1} and saved.consumed == saved.taken + 2
    expected = [next(it).keys for _ in range(8)]
    assert [b.keys for b in take(stream(copy, 0, 1, state=saved), 8)] == expected


def test_wrong_resolution_and_too_little_data_are_refused(shards):
    with pytest.raises(DataError, match="re-shard with --resolution 64"):
        take(ShardStream(shards, rank=0, world_size=1, batch_size=4, resolution=64, seed=0), 1)
    with pytest.raises(DataError, match="33 samples cannot give 8 workers a batch of 16"):
        stream(shards, 0, 8, batch=16)
    with pytest.raises(DataError, match="cannot give 2 workers x 4 loader workers a batch of 5"):
        stream(shards, 0, 2, batch=5, workers=4)


# --------------------------------------------------------------------------------------- tar reader


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_handles_long_names_and_resumes_at_a_byte(tmp_path, fmt):
    path = tmp_path / "long.tar"
    prefix = "d" * 120 + "/"  # past USTAR's 100 characters: GNU long-name or pax headers
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(4):
            for ext, data in (("png", b"P%d" % i), ("txt", b"caption %d" % i), ("json", b"{}")):
                info = tarfile.TarInfo(f"{prefix}sample{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    reader = ShardReader(str(path), seek=(0, 0), first=0)
    first = reader.read()
    assert first[0] == f"{prefix}sample000" and first[1] == {"png": b"P0", "txt": b"caption 0", "json": b"{}"}
    _, second, started, at = reader.read()
    reader.close()
    assert second["txt"] == b"caption 1" and 0 < started < at
    resumed = ShardReader(str(path), seek=(2, at), first=2)
    assert resumed.read()[1]["txt"] == b"caption 2"
    resumed.close()
    again = ShardReader(str(path), seek=(1, started), first=1)
    assert again.read()[1] == second
    again.close()
    stepped = ShardReader(str(path), seek=(0, 0), first=3)  # steps over three samples by their headers
    key, members, _, end = stepped.read()
    assert key.endswith("sample003") and members["png"] == b"P3" and end is None
    stepped.close()


# -------------------------------------------------------------------------------------------- pixels


def test_batches_carry_uint8_pixels_normalised_on_the_device(shards):
    batch = take(stream(shards, 0, 1, batch=4), 1)[0]
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (4, 3, 32, 32)
    assert all(c.startswith(("a ", "an ")) and c.endswith(" background") for c in batch.captions)
    x = to_model_input(batch.pixels, "cpu")
    assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0
    assert torch.equal(to_model_input(torch.tensor([0, 255], dtype=torch.uint8), "cpu"), torch.tensor([-1.0, 1.0]))
    assert to_model_input(batch.pixels, "cpu", torch.bfloat16).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ S3


def test_s3_shards_stream_and_resume_at_a_byte_offset(raw, s3_bucket, monkeypatch):
    data = make_shards(raw, f"s3://{s3_bucket}/shards", 7)
    # Loader workers reach S3 with their own clients and this test's endpoint and credentials, even
    # though their forkserver may have started before the test set them.
    s = stream(data, 0, 1, batch=3, workers=2)
    it = iter(s)
    first = [next(it) for _ in range(3)]
    saved = LoaderState.from_dict(s.state.to_dict())
    expected = [next(it) for _ in range(4)]
    del it

    ranges = []
    real_open = storage.S3Storage.open_read
    monkeypatch.setattr(storage.S3Storage, "open_read",
                        lambda self, uri, start=0: ranges.append(start) or real_open(self, uri, start))
    resumed = {}
    for position in range(2):  # each stream in-process, as a rank with loader_workers=0 would read it
        state = LoaderState(streams=[saved.streams[position]])
        resumed[position] = [b.keys for b in take(stream(data, position, 2, batch=3, state=state), 2)]
    assert resumed == {i: [b.keys for b in expected if b.stream == i] for i in range(2)}
    assert any(start > 0 for start in ranges), "a resumed shard is read with a ranged GET"
    assert exactly_once(keys_of(first + expected, 0), 21)


def test_a_restart_on_new_data_starts_the_next_epoch_and_keeps_the_counters():
    from training.loader.plan import restart_at_next_epoch

    old = [LoaderState(streams=[StreamState(stream=i, streams=4, next_epoch=3, taken=10 + i,
                                            skipped={"corrupt_image": 1}).to_dict()
                                for i in (2 * r, 2 * r + 1)]).to_dict() for r in range(2)]
    states = [restart_at_next_epoch(old, world_size=3, rank=r, loader_workers=1) for r in range(3)]
    streams = [StreamState.from_dict(d) for s in states for d in s.streams]
    assert [s.stream for s in streams] == [0, 1, 2] and {s.streams for s in streams} == {3}
    assert {s.next_epoch for s in streams} == {4} and not any(s.segments or s.buffer for s in streams)
    assert sum(s.taken for s in streams) == 10 + 11 + 12 + 13
    assert sum(s.skipped.get("corrupt_image", 0) for s in streams) == 4
