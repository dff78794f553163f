"""Caption adherence on the synthetic shapes task: does a generated image show the shape and colours
its prompt asked for?

The prompts are captions of data_prep/synth.py ("a red circle on a blue background"), so their truth
is known. Two sets: `heldout_prompts` draws from synth's HELDOUT_COMBINATIONS, combinations no training
shard holds (can the model compose a shape, colour and background it has only seen apart?), and
`seen_prompts` from the combinations training does hold. `classify` reads the three attributes back
from an image without any learnt model:

- background: the border pixels, each snapped to the nearest named colour; the most common name wins
  (a shape covers at most 70% of two sides, so never most of the border);
- foreground: the pixels far from the border's median colour, the cut chosen by Otsu's method on that
  distance, so a low-contrast pair (yellow on orange) and a soft-edged generated image both split;
- colour: the nearest named colour to the median of the foreground's core (its pixels furthest from
  the background, away from edges that blend the two colours), or None unless that median is near a
  named colour and most of the shape's interior is nearest it (a shape smeared between two colours);
- shape: the foreground's coverage map (how much of each pixel the shape covers) cut to its bounding
  box, padded to a square (never stretched: half a circle must not become a circle) and scaled to a
  fixed grid, against templates drawn by synth's own `draw_shape` (so it shares the generator's
  geometry) and blurred to several degrees (a model's output is soft), by soft intersection over
  union. None when it is not one clear shape: a second blob of comparable size (two shapes, noise),
  a best match under _MIN_MATCH or within _MIN_MARGIN of another shape's. An image read as None
  counts as wrong, so a gate never rewards output the classifier could only guess at.

tests/training/eval/ holds it to the generator's own images at 32 and 64 px, blurred, colour-shifted
and noisy copies of them, and to built failures: two shapes, half a shape, smeared colour, noise.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_prep.synth import COLOURS, HELDOUT_COMBINATIONS, SHAPES, caption_for, draw_shape
from training.errors import EvaluationError

ATTRIBUTES = ("colour", "shape", "background")
"""What adherence is scored on, in the order tables print them."""


_NAMES = tuple(COLOURS)


_RGB = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)


_GRID = 16  # side of the grid a shape's crop is compared on; a 32 px image's smallest shape is 10 px


_TEMPLATE_SIDE = 128  # templates are drawn this large, then scaled down to the grid


_BLURS = (0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.25)  # template blurs, sigma / side: a generated image's edges are soft


_MIN_CONTRAST = 30.0  # RGB distance below which a pixel is background whatever Otsu says (noise, JPEG)


_MIN_PIXELS = 4  # fewer foreground pixels than this: no shape at all


_MIN_MATCH = 0.62  # best soft IoU below this: no shape. Measured: clean renderings >= 0.635 (a small star at
# 32 px), halves of shapes <= 0.618 (a half circle against the diamond)


_MIN_MARGIN = 0.02  # the best shape must beat every other by this much. Measured: clean renderings >= 0.072,
# uniform noise 0.000-0.024 (mostly <= 0.001), blurred 32 px stars 0.000 and up (those are rejected)


_MAX_SECOND_BLOB = 0.15  # a second blob this large relative to the first: two shapes (or noise), not one


_MAX_COLOUR_DISTANCE = 90.0  # the core's median further than this from every named colour: no named colour


_MIN_COLOUR_AGREEMENT = 0.7  # fewer of the core's pixels nearest the chosen colour: a mix, not one colour


@dataclass(frozen=True)
class Prompt:
    """One synthetic prompt: what the image should show."""

    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.colour, self.background)


def heldout_prompts(n: int, *, seed: int = 0) -> list[Prompt]:
    """`n` distinct prompts from synth's HELDOUT_COMBINATIONS, the combinations no training shard holds
    (compositional generalisation), chosen by `seed` and balanced over shapes, colours and backgrounds."""
    return _balanced(_HELDOUT, n, seed, "held-out (data_prep.synth.HELDOUT_COMBINATIONS)")


def seen_prompts(n: int, *, seed: int = 0) -> list[Prompt]:
    """`n` distinct prompts from the combinations the generator does draw (training captions), chosen by
    `seed` and balanced as heldout_prompts: the same model's score on what it was trained on."""
    return _balanced(_SEEN, n, seed, "seen (the shape x colour x background grid less the held-out ones)")


_GRID_PROMPTS = tuple(Prompt(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c)
_HELDOUT = tuple(p for p in _GRID_PROMPTS if (p.shape, p.colour, p.background) in HELDOUT_COMBINATIONS)
_SEEN = tuple(p for p in _GRID_PROMPTS if (p.shape, p.colour, p.background) not in HELDOUT_COMBINATIONS)
# Both in grid order, never a set's iteration order: that varies with PYTHONHASHSEED, and the prompts must not.


def _balanced(pool: tuple[Prompt, ...], n: int, seed: int, what: str) -> list[Prompt]:
    """`n` distinct prompts of `pool` chosen by `seed` so that every shape, colour and background appears
    as evenly as n allows: each attribute's adherence is measured over all its values, not over whatever
    a random draw of a few prompts happened to hit."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(pool):
        raise EvaluationError(f"the number of {what} prompts must be 1-{len(pool)}, got {n!r}")
    grid = list(pool)
    random.Random(seed).shuffle(grid)
    counts: Counter = Counter()
    chosen = []
    for _ in range(n):
        # The least used shape and colour first, then the least used background; the shuffle breaks ties.
        best = min(grid, key=lambda p: (counts["s", p.shape] + counts["c", p.colour], counts["b", p.background]))
        grid.remove(best)
        chosen.append(best)
        counts.update([("s", best.shape), ("c", best.colour), ("b", best.background)])
    return chosen


@dataclass(frozen=True)
class Classified:
    """What `classify` sees in an image; shape and colour are None when nothing stands out of the
    background."""

    shape: str | None
    colour: str | None
    background: str


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Indices into COLOURS of the named colours nearest to each of `rgb` (..., 3)."""
    distances = np.linalg.norm(np.asarray(rgb, dtype=np.float32)[..., None, :] - _RGB, axis=-1)
    return distances.argmin(axis=-1)


def classify(image: np.ndarray) -> Classified:
    """Shape, colour and background of one uint8 image (H, W, 3)."""
    pixels = np.asarray(image)[..., :3].astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    snapped = nearest_colour(border)
    background = int(np.bincount(snapped, minlength=len(_NAMES)).argmax())
    reference = np.median(border[snapped == background], axis=0)  # the background as rendered

    distance = np.linalg.norm(pixels - reference, axis=-1)
    mask = distance > max(_otsu_threshold(distance), _MIN_CONTRAST)
    if mask.sum() < _MIN_PIXELS:
        return Classified(shape=None, colour=None, background=_NAMES[background])
    # The core: inside the mask's edge and among its pixels furthest from the background, where a
    # soft or anti-aliased edge has not blended the two colours.
    interior = _erode(mask)
    if interior.sum() < _MIN_PIXELS:
        interior = mask
    core = interior & (distance >= np.median(distance[interior]))
    foreground = np.median(pixels[core], axis=0)
    # Agreement is judged over the whole interior, not the core: the core is the half furthest from the
    # background, which for a shape smeared from black to red is its black half alone.
    colour = _clear_colour(pixels[interior], foreground)
    # A pixel blending the two colours a : 1-a lies a * |fg - bg| from the background, so its distance
    # over the full contrast is how much of it the shape covers; the background's own spread (noise,
    # texture) is subtracted first, so the background reads as 0.
    floor = float(np.median(np.linalg.norm(border[snapped == background] - reference, axis=-1)))
    contrast = max(float(np.linalg.norm(foreground - reference)) - floor, 1.0)
    coverage = np.clip((distance - floor) / contrast, 0.0, 1.0)
    return Classified(shape=_match_shape(coverage), colour=colour, background=_NAMES[background])


def _clear_colour(interior: np.ndarray, foreground: np.ndarray) -> str | None:
    """The named colour of the foreground's core, or None when it is not one clear colour: its median
    is far from every named colour, or too few of its pixels are nearest that colour (two colours
    smeared together: no one colour holds most of the shape's interior)."""
    index = int(nearest_colour(foreground))
    if float(np.linalg.norm(foreground - _RGB[index])) > _MAX_COLOUR_DISTANCE:
        return None
    if float(np.mean(nearest_colour(interior) == index)) < _MIN_COLOUR_AGREEMENT:
        return None
    return _NAMES[index]


def _otsu_threshold(values: np.ndarray) -> float:
    """The cut of `values` that maximises the between-class variance (Otsu 1979)."""
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centres)
    total, total_mean = weight[-1], mean[-1]
    w0, w1 = weight[:-1], total - weight[:-1]
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return float(edges[-1])  # a flat image: everything is background
    m0 = mean[:-1] / np.maximum(w0, 1)
    m1 = (total_mean - mean[:-1]) / np.maximum(w1, 1)
    between = np.where(valid, w0 * w1 * (m0 - m1) ** 2, -1.0)
    return float(edges[1:][between.argmax()])


def _erode(mask: np.ndarray) -> np.ndarray:
    """`mask` without its edge pixels (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def _to_grid(coverage: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """The bounding box of `inside` (default: `coverage` >= half its peak) cut out of `coverage`, padded
    with zeros to a square around its centre and scaled to _GRID x _GRID. Padded, not stretched: a
    stretched half circle or a 2:1 rectangle would match a circle or a square."""
    if inside is None:
        inside = coverage >= 0.5 * min(float(coverage.max()), 1.0)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    crop = coverage[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = crop
    return np.asarray(Image.fromarray(square, mode="F").resize((_GRID, _GRID), Image.Resampling.BILINEAR))


@cache
def _templates() -> dict[tuple[str, float], np.ndarray]:
    """Each shape drawn by synth's `draw_shape`, then blurred by each of _BLURS (sigma as a fraction
    of the side) and cut out exactly as `_match_shape` cuts out an image's foreground: a blur shrinks
    a star's bounding box (its tips fade first), so the templates must shrink the same way."""
    pad = round(3 * max(_BLURS) * _TEMPLATE_SIDE) + 2
    templates = {}
    for shape in SHAPES:
        image = Image.new("L", (_TEMPLATE_SIDE + 2 * pad,) * 2, 0)
        draw_shape(ImageDraw.Draw(image), shape, pad, pad, _TEMPLATE_SIDE, 255)
        for blur in _BLURS:
            blurred = image.filter(ImageFilter.GaussianBlur(blur * _TEMPLATE_SIDE)) if blur else image
            coverage = np.asarray(blurred, dtype=np.float32)
            # Normalised by its peak, as an image's coverage is by its foreground's (blurred) core colour.
            templates[shape, blur] = _to_grid(coverage / coverage.max())
    return templates


def _match_shape(coverage: np.ndarray) -> str | None:
    """The shape whose template (at any blur) overlaps the foreground's crop best (soft IoU), or None
    when the foreground is not one clear shape: a second blob of comparable size (two shapes, or
    noise), a best match under _MIN_MATCH (half a shape, a scribble), or one within _MIN_MARGIN of the
    best match of another shape (an ambiguous blob)."""
    best = _shape_scores(coverage)
    if best is None:
        return None
    ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)
    (shape, score), (_, runner_up) = ranked[0], ranked[1]
    if score < _MIN_MATCH or score - runner_up < _MIN_MARGIN:
        return None
    return shape


def _shape_scores(coverage: np.ndarray) -> dict[str, float] | None:
    """Each shape's best soft IoU (over its blurs) with the largest blob of `coverage`; None when there
    is no blob or a second one of comparable size."""
    inside = coverage >= 0.5 * min(float(coverage.max()), 1.0)
    blobs = _blobs(inside)
    if not blobs:
        return None
    blobs.sort(key=len, reverse=True)
    if len(blobs) > 1 and len(blobs[1]) >= max(_MIN_PIXELS, _MAX_SECOND_BLOB * len(blobs[0])):
        return None
    largest = np.zeros_like(inside)
    largest[tuple(np.array(blobs[0]).T)] = True
    # Only the largest blob is matched: a speck of noise beside the shape must not widen its box. Its
    # soft edge (coverage under one half) is kept within two pixels of it.
    near = largest
    for _ in range(2):
        near = near | _dilate(near)
    observed = _to_grid(np.where(near, coverage, 0.0), largest)
    best: dict[str, float] = {}
    for (shape, _), template in _templates().items():
        score = float(np.minimum(observed, template).sum() / np.maximum(observed, template).sum())
        best[shape] = max(best.get(shape, 0.0), score)
    return best


def _dilate(mask: np.ndarray) -> np.ndarray:
    """`mask` grown by one pixel (8-neighbourhood)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def _blobs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """The 8-connected components of `mask`, each a list of (row, column). A plain flood fill: images
    here are at most a few hundred pixels a side, and it keeps scipy out of the dependencies."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    blobs = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, blob = [start], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        blobs.append(blob)
    return blobs


def adherence(images: np.ndarray, prompts: list[Prompt]) -> dict[str, float]:
    """Fractions of `images` (N, H, W, 3) whose colour, shape and background match prompts[i]'s,
    and n, the number of images."""
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"adherence needs one prompt per image and at least one image; got {len(images)} "
                         f"images and {len(prompts)} prompts")
    seen = [classify(image) for image in images]
    return score_classified(seen, prompts)


def score_classified(seen: list[Classified], prompts: list[Prompt]) -> dict[str, float]:
    """Fractions of `seen` whose colour, shape and background match prompts[i]'s, and n."""
    scores = {f"{a}_adherence": float(np.mean([getattr(s, a) == getattr(p, a) for s, p in zip(seen, prompts)]))
              for a in ATTRIBUTES}
    return {**scores, "n": len(prompts)}
