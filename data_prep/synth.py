"""Synthetic image-caption pairs of flat shapes: a dataset whose ground truth is known.

Each image is one shape in one named colour on a plain background of another colour, and the caption
says exactly that ("a red circle on a blue background"). `metadata.jsonl` keeps every attribute, so
evaluation can check whether generated images show the shape and colours the prompt asked for.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from data_prep import storage
from data_prep.checks import require_int
from data_prep.errors import DataPrepError

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
"""Shape names, as they appear in captions."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (130, 40, 170),
    "pink": (245, 120, 190),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Colour names and RGB values, far enough apart that a small model can learn to tell them apart."""

HELDOUT_COMBINATIONS: frozenset[tuple[str, str, str]] = frozenset({
    ('circle', 'red', 'green'), ('square', 'green', 'blue'), ('triangle', 'blue', 'yellow'),
    ('diamond', 'yellow', 'orange'), ('star', 'orange', 'purple'), ('cross', 'purple', 'pink'),
    ('circle', 'pink', 'cyan'), ('square', 'cyan', 'white'), ('triangle', 'white', 'black'),
    ('diamond', 'black', 'red'), ('star', 'red', 'yellow'), ('cross', 'green', 'orange'),
    ('circle', 'blue', 'purple'), ('square', 'yellow', 'pink'), ('triangle', 'orange', 'cyan'),
    ('diamond', 'purple', 'white'), ('star', 'pink', 'black'), ('cross', 'cyan', 'red'),
    ('circle', 'white', 'green'), ('square', 'black', 'blue'), ('triangle', 'red', 'purple'),
    ('diamond', 'green', 'pink'), ('star', 'blue', 'cyan'), ('cross', 'yellow', 'white'),
    ('circle', 'orange', 'black'), ('square', 'purple', 'red'), ('triangle', 'pink', 'green'),
    ('diamond', 'cyan', 'blue'), ('star', 'white', 'yellow'), ('cross', 'black', 'orange'),
    ('circle', 'red', 'cyan'), ('square', 'green', 'white'), ('triangle', 'blue', 'black'),
    ('diamond', 'yellow', 'red'), ('star', 'orange', 'green'), ('cross', 'purple', 'blue'),
})
"""(shape, colour, background) combinations the generator never draws, so they are in no shard: evaluation
asks for them to measure compositional generalisation (every shape, colour and background, and every pair of
them, is still trained on in other combinations) rather than recall of training captions. 36 of the 540,
spread evenly: each shape 6 times, each colour and background 3 or 4 times. Changing this list changes
what "held-out" means for every model already scored: scores before and after are not comparable."""

METADATA_NAME = "metadata.jsonl"

_MIN_IMAGE_SIZE = 16  # below this a star is a blob and the captions stop being true
_SIZE_RANGE = (0.3, 0.7)  # shape side as a fraction of the image side


@dataclass
class SynthSample:
    """One generated image and what is in it."""

    key: str
    """File stem of `{key}.png` / `{key}.txt`, e.g. "synth-000000"."""
    shape: str
    """One of SHAPES."""
    colour: str
    """Shape colour, a key of COLOURS."""
    background: str
    """Background colour, a key of COLOURS, never equal to `colour`."""
    center: tuple[float, float]
    """Centre of the shape's bounding square as (x, y) fractions of the image width and height."""
    size: float
    """Side of the shape's bounding square as a fraction of the image side."""
    caption: str
    """The text written to `{key}.txt`."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(shape: str, colour: str, background: str) -> str:
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def generate_synthetic(out_dir: str | Path, n: int, *, seed: int = 0, image_size: int = 64) -> list[SynthSample]:
    """Write `n` shape images with sidecar captions and a metadata.jsonl into `out_dir`.

    Deterministic in (n, seed, image_size): the same arguments give byte-identical files. Existing
    files with other keys in `out_dir` are left alone; metadata.jsonl describes only this call.
    """
    require_int(n, "synthetic sample count n", 1)
    require_int(image_size, "synthetic image_size", _MIN_IMAGE_SIZE)
    out = Path(storage.local_path(out_dir))  # an s3:// path must never become a local folder "s3:"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colour_names = list(COLOURS)
    samples: list[SynthSample] = []
    for i in range(n):
        sample, image = _draw_one(f"synth-{i:06d}", rng, colour_names, image_size)
        # Through a temporary name, so a crash never leaves a half PNG under a real name. Not durable (no
        # fsync): this guards against a crashed process, not power loss, and syncing thousands of tiny
        # files would make generation many times slower.
        with storage.temporary_file(out / f"{sample.key}.png") as tmp:
            image.save(tmp, format="PNG")
        with storage.temporary_file(out / f"{sample.key}.txt") as tmp:
            Path(tmp).write_bytes(sample.caption.encode("utf-8"))
        samples.append(sample)
    lines = "".join(json.dumps(asdict(s), sort_keys=True) + "\n" for s in samples)
    with storage.temporary_file(out / METADATA_NAME) as tmp:
        Path(tmp).write_bytes(lines.encode("utf-8"))
    return samples


def _draw_one(key: str, rng: random.Random, colour_names: list[str],
              image_size: int) -> tuple[SynthSample, Image.Image]:
    shape = rng.choice(SHAPES)
    colour = rng.choice(colour_names)
    # Held-out combinations are never drawn; every (shape, colour) keeps 7 to 9 backgrounds.
    background = rng.choice([c for c in colour_names if c != colour and (shape, colour, c) not in HELDOUT_COMBINATIONS])
    side = max(4, round(rng.uniform(*_SIZE_RANGE) * image_size))
    # Choose the top-left corner in pixels so the whole shape is inside the image, then report the
    # centre and size of the box actually drawn (no rounding drift between metadata and pixels).
    x0 = rng.randint(0, image_size - side)
    y0 = rng.randint(0, image_size - side)
    image = Image.new("RGB", (image_size, image_size), COLOURS[background])
    draw_shape(ImageDraw.Draw(image), shape, x0, y0, side, COLOURS[colour])
    sample = SynthSample(
        key=key,
        shape=shape,
        colour=colour,
        background=background,
        center=((x0 + side / 2) / image_size, (y0 + side / 2) / image_size),
        size=side / image_size,
        caption=caption_for(shape, colour, background),
    )
    return sample, image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill: tuple[int, int, int]) -> None:
    # PIL boxes are inclusive, so the last pixel of a `side`-wide box is x0 + side - 1.
    x1, y1 = x0 + side - 1, y0 + side - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "star":
        outer, inner = (side - 1) / 2, (side - 1) / 2 * 0.42
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        arm = max(1, round(side / 3))
        a0 = x0 + (side - arm) // 2
        b0 = y0 + (side - arm) // 2
        draw.rectangle((a0, y0, a0 + arm - 1, y1), fill=fill)
        draw.rectangle((x0, b0, x1, b0 + arm - 1), fill=fill)
    else:
        raise DataPrepError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")

