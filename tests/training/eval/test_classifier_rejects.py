"""The classifier rejects what a model gets wrong instead of naming the nearest shape: two shapes in one
image, half a shape, a shape smeared between two colours, and pure noise all read as no shape (or no
colour), while clean renderings still read correctly at 32 and 64 px. The failures are built here the way
a diffusion model produces them, from synth's own `draw_shape`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from data_prep.synth import COLOURS, SHAPES, draw_shape
from training.eval.shapes import classify

SIZES = (32, 64)


def canvas(size: int, background: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), COLOURS[background])
    return image, ImageDraw.Draw(image)


def centred(size: int, shape: str, colour: str, background: str, fraction: float = 0.6) -> np.ndarray:
    image, draw = canvas(size, background)
    side = round(fraction * size)
    x0 = (size - side) // 2
    draw_shape(draw, shape, x0, x0, side, COLOURS[colour])
    return np.asarray(image)


@pytest.mark.parametrize("size", SIZES)
def test_clean_renderings_of_every_combination_read_correctly(size):
    """Every shape in every colour on two backgrounds, centred and in a corner at two sizes."""
    for shape in SHAPES:
        for colour in COLOURS:
            for background in [b for b in ("white", "black", "blue") if b != colour][:2]:
                for fraction, corner in ((0.6, False), (0.35, True)):
                    image, draw = canvas(size, background)
                    side = round(fraction * size)
                    x0 = 0 if corner else (size - side) // 2
                    draw_shape(draw, shape, x0, x0, side, COLOURS[colour])
                    seen = classify(np.asarray(image))
                    assert (seen.shape, seen.colour, seen.background) == (shape, colour, background), \
                        (size, shape, colour, background, fraction)


@pytest.mark.parametrize("size", SIZES)
def test_two_shapes_in_one_image_are_no_shape(size):
    side = round(0.4 * size)
    for first in SHAPES:
        for second in SHAPES:
            image, draw = canvas(size, "blue")
            draw_shape(draw, first, 1, 1, side, COLOURS["red"])
            draw_shape(draw, second, size - side - 1, size - side - 1, side, COLOURS["red"])
            seen = classify(np.asarray(image))
            assert seen.shape is None and seen.background == "blue", (first, second, seen)


# The top half of a triangle is a smaller triangle, so it is left out of the vertical cut.
HALVES = [(s, "left") for s in SHAPES] + [(s, "top") for s in SHAPES if s != "triangle"]


@pytest.mark.parametrize("size", SIZES)
def test_half_a_shape_is_not_read_as_that_shape(size):
    """A shape cut in half (the other half painted over with background): never read as the shape it
    was cut from, and in all but at most one case per size rejected outright."""
    rejected = 0
    for shape, keep in HALVES:
        image, draw = canvas(size, "white")
        side = round(0.6 * size)
        x0 = (size - side) // 2
        draw_shape(draw, shape, x0, x0, side, COLOURS["green"])
        cut = x0 + side // 2
        draw.rectangle((cut, 0, size - 1, size - 1) if keep == "left" else (0, cut, size - 1, size - 1),
                       fill=COLOURS["white"])
        seen = classify(np.asarray(image))
        assert seen.shape != shape, (shape, keep, seen)
        rejected += seen.shape is None
    assert rejected >= len(HALVES) - 1, rejected  # measured: 11/11 at both sizes; closest call: a half circle, best
    # matching a diamond at 0.618 against the 0.62 floor


def smeared(size: int, shape: str, left: str, right: str, background: str) -> np.ndarray:
    """`shape` whose colour runs from `left` at its left edge to `right` at its right edge, blurred."""
    a = centred(size, shape, left, background).astype(np.float32)
    b = centred(size, shape, right, background).astype(np.float32)
    side = round(0.6 * size)
    x0 = (size - side) // 2
    t = np.clip((np.arange(size) - x0) / (side - 1), 0, 1)[None, :, None]
    mixed = (a * (1 - t) + b * t).round().astype(np.uint8)
    return np.asarray(Image.fromarray(mixed).filter(ImageFilter.GaussianBlur(size / 64)))


@pytest.mark.parametrize("size", SIZES)
def test_a_shape_smeared_between_two_colours_has_no_colour(size):
    # Red into blue passes through purple and red into yellow through orange, named colours, so those blends
    # are a fair "purple" or "orange"; these pairs blend through no named colour.
    pairs = [("red", "cyan"), ("green", "pink"), ("yellow", "cyan"), ("black", "orange"), ("blue", "green"),
             ("purple", "cyan")]
    for shape in ("square", "circle", "diamond"):
        for left, right in pairs:
            seen = classify(smeared(size, shape, left, right, "white"))
            assert seen.colour is None and seen.background == "white", (shape, left, right, seen)
            # Each colour on its own still reads.
            assert classify(centred(size, shape, left, "white")).colour == left


@pytest.mark.parametrize("size", SIZES)
def test_noise_is_no_shape_and_no_colour(size):
    for seed in range(20):
        noise = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        seen = classify(noise)
        assert seen.shape is None and seen.colour is None, (seed, seen)


@pytest.mark.parametrize("size", SIZES)
def test_aspect_ratio_is_kept(size):
    """A 2:1 rectangle is no square and a 2:1 ellipse no circle: the crop is padded, not stretched."""
    for draw_it, wrong in ((lambda d, box: d.rectangle(box, fill=COLOURS["red"]), "square"),
                           (lambda d, box: d.ellipse(box, fill=COLOURS["red"]), "circle")):
        image, draw = canvas(size, "white")
        draw_it(draw, (size // 8, size // 3, size - size // 8, size // 3 + size * 3 // 8))
        assert classify(np.asarray(image)).shape != wrong
