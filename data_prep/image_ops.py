"""Decode, resize and encode single images: the CPU-bound core of the shard stage.

Every function is pure (bytes or images in, bytes or images out) so a process pool can run them.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from data_prep.errors import DataPrepError

IMAGE_FORMATS = ("jpg", "png", "webp")
"""Formats a shard can store images in; also the member extension in the tar."""

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ImageDecodeError(DataPrepError):
    """The bytes are not a complete image PIL can decode (corrupt, truncated, unknown format)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully into an RGB image, upright as the camera meant it.

    Raises ImageDecodeError on anything undecodable. `Image.open` only reads the header, so the pixel
    data is forced with `.load()` here: otherwise a truncated file passes and fails later, inside a
    training worker.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raises) for huge images and palette transparency; the bomb check
            # below is the one that matters, and it raises on its own above 2x MAX_IMAGE_PIXELS.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            img.load()
            # Phone photos store rotation in EXIF; without this they train sideways.
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # OSError covers UnidentifiedImageError and "image file is truncated"; the others are what
        # PIL's plugins raise on malformed chunks.
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Fully transparent pixels often hold black or garbage RGB; composite on white so the model
        # sees what a viewer shows.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to `resolution` and crop the centre to `resolution` x `resolution`.

    Done as one resample of the centred square (`resize(box=...)`), which equals resize-then-crop but
    never resamples pixels that are cropped away. `reducing_gap` lets PIL shrink big photos by integer
    steps first, several times faster with no visible difference at the output size.
    """
    if resolution < 1:
        raise DataPrepError(f"resolution must be >= 1, got {resolution}")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode an image as `fmt` ("jpg", "png" or "webp"); `quality` (1-100) is ignored for PNG.

    No metadata is written, so the same pixels always give the same bytes.
    """
    if fmt not in _PIL_FORMAT:
        raise DataPrepError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 chroma: at 64-256 px, 4:2:0 subsampling visibly smears the colour edges of small objects.
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()
