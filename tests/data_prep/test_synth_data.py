"""Synthetic shape data: deterministic, captions true to metadata and pixels, files complete."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from data_prep.errors import DataPrepError
from data_prep.synth import COLOURS, HELDOUT_COMBINATIONS, SHAPES, SynthSample, generate_synthetic


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = generate_synthetic(tmp_path / "a", 20, seed=3)
    b = generate_synthetic(tmp_path / "b", 20, seed=3)
    c = generate_synthetic(tmp_path / "c", 20, seed=4)
    assert a == b
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert [s.caption for s in a] != [s.caption for s in c]


def test_files_captions_and_metadata_agree(tmp_path):
    samples = generate_synthetic(tmp_path, 40, seed=0, image_size=48)
    assert [s.key for s in samples] == [f"synth-{i:06d}" for i in range(40)]
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"metadata.jsonl"} | {f"synth-{i:06d}.{e}" for i in range(40) for e in ("png", "txt")}

    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    for sample, row in zip(samples, rows):
        assert SynthSample(**{**row, "center": tuple(row["center"])}) == sample
        assert (tmp_path / f"{sample.key}.txt").read_text(encoding="utf-8") == sample.caption
        assert sample.shape in SHAPES and sample.colour in COLOURS and sample.background in COLOURS
        assert sample.colour != sample.background
        assert f" {sample.colour} {sample.shape} on " in sample.caption
        assert sample.caption.endswith(f" {sample.background} background")
        assert "a orange" not in sample.caption and "a indigo" not in sample.caption
        # The whole shape lies inside the image.
        half = sample.size / 2
        assert 0 <= sample.center[0] - half and sample.center[0] + half <= 1
        assert 0 <= sample.center[1] - half and sample.center[1] + half <= 1


def test_pixels_show_what_the_caption_says(tmp_path):
    size = 64
    samples = generate_synthetic(tmp_path, 60, seed=1, image_size=size)
    assert {s.shape for s in samples} == set(SHAPES)  # every shape drawn at least once here
    for s in samples:
        with Image.open(tmp_path / f"{s.key}.png") as im:
            assert im.size == (size, size) and im.mode == "RGB"
            cx, cy = s.center[0] * size, s.center[1] * size
            # Every shape covers its own centre.
            assert im.getpixel((int(cx), int(cy))) == COLOURS[s.colour], s
            # At least one image corner lies outside the shape's box (sizes are <= 0.7) and shows background.
            half = s.size * size / 2
            x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
            corners = [(0, 0), (size - 1, 0), (0, size - 1), (size - 1, size - 1)]
            outside = [(x, y) for x, y in corners if not (x0 <= x < x1 and y0 <= y < y1)]
            assert outside and all(im.getpixel(c) == COLOURS[s.background] for c in outside), s


@pytest.mark.parametrize("n", [0, -1])
def test_rejects_non_positive_count(tmp_path, n):
    with pytest.raises(DataPrepError, match="n must be an integer >= 1"):
        generate_synthetic(tmp_path / "out", n)


def test_leaves_no_temp_files(tmp_path):
    generate_synthetic(tmp_path, 10)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_heldout_combinations_are_never_drawn_and_every_value_is_still_trained(tmp_path):
    """The held-out list is what evaluation's compositional prompts come from: the generator must never
    draw one (so no shard holds it), and every shape, colour and background, and every pair of them,
    must still be drawn in other combinations, or a held-out prompt would ask for something never seen."""
    grid = {(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c}
    assert HELDOUT_COMBINATIONS < grid and 24 <= len(HELDOUT_COMBINATIONS) <= 60
    training = grid - HELDOUT_COMBINATIONS
    for i, j in ((0, 1), (0, 2), (1, 2)):  # (shape, colour), (shape, background), (colour, background)
        assert {(t[i], t[j]) for t in training} == {(t[i], t[j]) for t in grid}
    samples = generate_synthetic(tmp_path, 3000, seed=0, image_size=16)
    drawn = {(s.shape, s.colour, s.background) for s in samples}
    assert not drawn & HELDOUT_COMBINATIONS
    assert len(drawn) > 0.95 * len(training)  # 3000 draws over 504 combinations: the rest all turn up
    assert {s.shape for s in samples} == set(SHAPES)
    assert {s.colour for s in samples} == {s.background for s in samples} == set(COLOURS)
