"""The per-rank shard stream: equal counts, disjoint ranks, full epochs, exact resume, counted skips."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import pytest

from data_prep.dataset import read_dataset
from data_prep.shard import ShardConfig, build_shards
from data_prep.synth import generate_synthetic
from training.shard_loader import DataError, LoaderState, ShardStream


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    generate_synthetic(root / "raw", 40, seed=3, image_size=32)
    build_shards(ShardConfig(source=str(root / "raw"), output=str(root / "shards"), resolution=32,
                             samples_per_shard=7, image_format="png", processes=1, progress=False))
    return root / "shards"


def stream(path, rank, world, batch=4, state=None, buffer=8):
    return ShardStream(str(path), rank=rank, world_size=world, batch_size=batch, resolution=32, seed=11,
                       shuffle_buffer=buffer, state=state)


def take(s, n):
    it = iter(s)
    return [next(it) for _ in range(n)]


def epoch_keys(path, rank, world, batch=4):
    s = stream(path, rank, world, batch)
    batches = s.plan(0).samples // batch
    return [k for b in take(s, batches) for k in b.keys]


@pytest.mark.parametrize("world", [2, 3, 8])  # 6 shards: shard split for 2 and 3 ranks, sample split for 8
def test_ranks_get_equal_disjoint_shares(shards, world):
    per_rank = [epoch_keys(shards, r, world, batch=2) for r in range(world)]
    assert len({len(keys) for keys in per_rank}) == 1, "every rank must take the same number of batches"
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)), "a sample was given to two ranks in one epoch"
    assert len(flat) >= 40 - world * 8  # at most a shard or batch remainder per rank is left out


def test_single_rank_epoch_sees_every_sample_once(shards):
    keys = epoch_keys(shards, 0, 1, batch=4)
    assert len(keys) == 40 and len(set(keys)) == 40


def test_epochs_reshuffle_but_repeat_exactly_for_same_seed(shards):
    a = [b.keys for b in take(stream(shards, 0, 2), 8)]
    b = [b.keys for b in take(stream(shards, 0, 2), 8)]
    assert a == b
    s = stream(shards, 0, 2)
    per_epoch = s.plan(0).samples // 4
    assert s.plan(0).samples == s.plan(1).samples
    assert a[:per_epoch] != a[per_epoch:2 * per_epoch]


def test_resume_continues_with_exactly_the_next_batches(shards):
    s = stream(shards, 1, 2)
    it = iter(s)
    for _ in range(5):  # crosses an epoch boundary (4 batches per epoch here)
        next(it)
    saved = LoaderState.from_dict(s.state.to_dict())
    expected = [next(it) for _ in range(6)]
    resumed = take(stream(shards, 1, 2, state=saved), 6)
    assert [b.keys for b in resumed] == [b.keys for b in expected]
    for got, want in zip(resumed, expected):
        assert got.captions == want.captions
        assert (got.pixels == want.pixels).all()


def test_batches_are_normalised_images(shards):
    batch = take(stream(shards, 0, 1), 1)[0]
    assert batch.pixels.shape == (4, 3, 32, 32)
    assert batch.pixels.min() >= -1.0 and batch.pixels.max() <= 1.0
    assert all(c.startswith(("a ", "an ")) and c.endswith(" background") for c in batch.captions)


def test_wrong_resolution_and_too_little_data_are_refused(shards):
    with pytest.raises(DataError, match="re-shard with --resolution 64"):
        take(ShardStream(str(shards), rank=0, world_size=1, batch_size=4, resolution=64, seed=0,
                         shuffle_buffer=0), 1)
    with pytest.raises(DataError, match="cannot give 8 workers a batch of 16"):
        stream(shards, 0, 8, batch=16)


def test_undecodable_sample_is_counted_and_counts_stay_equal(shards, tmp_path):
    # Corrupt one image inside a copy of the shards (and keep the manifest: the loader must cope).
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    victim = copy / read_dataset(str(copy)).shards[0].name
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(victim, "w", format=tarfile.USTAR_FORMAT) as tar:
        first_png = next(m.name for m, _ in members if m.name.endswith(".png"))
        for m, data in members:
            if m.name == first_png:
                data = b"not a png"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    s = stream(copy, 0, 1, batch=4, buffer=0)
    keys = [k for b in take(s, 10) for k in b.keys]
    assert len(keys) == 40
    assert s.state.skipped == {"UnidentifiedImageError": 1}
    assert max(Counter(keys).values()) == 2  # the gap was filled from the epoch's start

    # A resume after the skipped sample replays the read positions, not the decoded count.
    s = stream(copy, 0, 1, batch=4, buffer=0)
    it = iter(s)
    while not s.state.skipped:
        next(it)
    saved = LoaderState.from_dict(s.state.to_dict())
    assert saved.consumed == saved.taken + 1
    expected = [next(it).keys for _ in range(9)]  # runs through the top-up into the next epoch
    assert [b.keys for b in take(stream(copy, 0, 1, batch=4, buffer=0, state=saved), 9)] == expected
