"""The new-data sensor's count: identity by content, as the shard step (no Prefect server needed)."""

from __future__ import annotations

import shutil

import pytest

from data_prep.errors import DataPrepError
from data_prep.shard import ShardConfig, build_shards
from data_prep.synth import generate_synthetic
from pipelines.sensor import count_new_items


def test_new_means_bytes_the_dataset_lacks_whatever_the_name(tmp_path):
    source, dataset, more = tmp_path / "raw", tmp_path / "dataset", tmp_path / "more"
    generate_synthetic(source, 4, seed=3, image_size=32)
    first = count_new_items(str(source), str(dataset))
    assert (first.items, first.new, first.dataset_samples) == (4, 4, 0)  # no dataset yet: all new

    build_shards(ShardConfig(source=str(source), output=str(dataset), resolution=32, processes=1, progress=False))
    assert count_new_items(str(source), str(dataset)).new == 0

    # A copy under another name is not new; new bytes under a name the dataset already has are.
    images = sorted(source.glob("*.png"))
    shutil.copy(images[0], source / "renamed.png")
    shutil.copy(images[0].with_suffix(".txt"), source / "renamed.txt")
    generate_synthetic(more, 1, seed=77, image_size=32)
    (new_image,) = more.glob("*.png")
    shutil.copy(new_image, images[1])
    found = count_new_items(str(source), str(dataset))
    assert (found.items, found.new, found.dataset_samples) == (5, 1, 4)


def test_url_tables_are_refused_with_the_alternative(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("url,caption\nhttps://example.com/a.png,a cat\n")
    with pytest.raises(DataPrepError, match="schedule `retrain` itself"):
        count_new_items(str(table), str(tmp_path / "dataset"))
