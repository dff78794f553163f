"""One source image's bytes -> the bytes stored in a shard, or a precise reason to skip it.

    process_image(data, options)
      1. byte checks            empty_file, too_large; a PNG without IEND or a short WebP: truncated_image
      2. Image.open (header)    not_an_image (no known signature), corrupt_image (signature, broken header);
                                pixel guard: too_many_pixels; too_small -- all before any pixel is decoded
      3. JPEG draft             decode at 1/2, 1/4 or 1/8 scale when the target still fits (the speed is here)
      4. load                   truncated_image, corrupt_image
      5. EXIF orientation       upright as the camera meant it (broken EXIF: left as stored)
      6. mode -> RGB            CMYK, 16-bit grey scaled, alpha composited over white
      7. resize                 center_crop | pad | none
      8. encode                 jpg (4:4:4) | png | webp, no metadata: same input and options, same bytes
      -> ProcessedImage (data + sizes + aspect bucket) or ImageSkip(reason, detail)

Everything here is pure (bytes and options in, result out), so process pools and Ray tasks can run it. Per-image
problems are ImageSkip, counted by reason, never DataPrepError: one bad file must not stop a run.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

from PIL import Image, ImageFile, features

from data_prep.checks import is_int, require, require_choice, require_int
from data_prep.errors import DataPrepError

IMAGE_FORMATS = ("jpg", "png", "webp")
"""Formats a shard can store images in; also the member extension in the tar."""

RESIZE_MODES = ("center_crop", "pad", "none")
JPEG_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
"""Chroma subsampling names and Pillow's codes for them."""
"""How images are fitted to `ProcessOptions.resolution`: see ProcessOptions.resize_mode."""

SKIP_REASONS = (
    "empty_file",
    "too_large",
    "not_an_image",
    "too_many_pixels",
    "truncated_image",
    "corrupt_image",
    "too_small",
)
"""Every `ImageSkip.reason`."""

SOURCE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF") + (("AVIF",) if features.check("avif") else ())
"""Pillow formats accepted as sources (passed to `Image.open(formats=...)`); anything else is `not_an_image`.

An allow-list rather than all of Pillow's ~40 readers: it keeps exotic decoders (EPS runs Ghostscript) away from
untrusted bytes, and stops lenient readers (TGA has no magic number) from "recognising" random bytes as an image.
JPEG includes MPO, the multi-picture JPEG many phones write (Pillow's JPEG reader opens it). AVIF only where this
Pillow was built with it: `Image.open` raises KeyError for a format it does not have.
"""

MAX_BUCKET_ASPECT = 4.0
"""Most elongated aspect bucket (long side / short side); more extreme images go to the 4:1 or 1:4 bucket."""

_JPEG_FORMATS = ("JPEG", "MPO")
_RESAMPLE = Image.Resampling.LANCZOS  # BICUBIC saves ~20% on full-size decodes, nothing after a draft: kept LANCZOS
_REDUCING_GAP = 3.0
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright; the same table as ImageOps.exif_transpose.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length, type and CRC of the (always empty) IEND chunk
_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageSkip(Exception):
    """One image left out, and why: counted by `reason` and logged with `detail`; the run goes on.

    Deliberately not a DataPrepError, which stops a run: a skip is an expected property of real data.
    """

    def __init__(self, reason: str, detail: str) -> None:
        require_choice(reason, "skip reason", SKIP_REASONS, error=ValueError)
        # Both go to Exception.__init__ so the exception pickles (process pools and Ray send it back).
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class ImageDecodeError(DataPrepError):
    """Raised by `decode_image` (the pre-ProcessOptions API): the bytes are not a decodable image.

    `reason` is the ImageSkip reason behind it. New code calls `process_image` and catches ImageSkip.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        return type(self), (str(self), self.reason)  # `args` holds only the message


@dataclass(frozen=True)
class ProcessOptions:
    """How `process_image` turns a source image into a stored one; validated on construction."""

    resolution: int = 256
    """Target side in pixels (8-4096) for center_crop and pad; with resize_mode "none" only the aspect bucket
    uses it."""
    resize_mode: str = "center_crop"
    """center_crop: shorter side to `resolution`, centre square kept. pad: longer side to `resolution`, the rest
    filled with `pad_color`. none: stored at the source size."""
    image_format: str = "jpg"
    """Encoding of the stored image: jpg, png or webp."""
    quality: int = 95
    """JPEG/WebP quality, 1-100 (ignored for png)."""
    jpeg_subsampling: str = "4:4:4"
    """JPEG chroma subsampling: 4:4:4 keeps full colour resolution (the colour edges of small objects stay
    sharp at 64-256 px); 4:2:0, what most web images and img2dataset's OpenCV use, halves it for ~20% smaller
    files and ~30% faster encoding."""
    min_size: int = 0
    """Skip images whose shorter side is below this many pixels (`too_small`); 0 keeps every size."""
    max_pixels: int = 89_478_485
    """Skip images whose header claims more than width*height pixels (`too_many_pixels`), before any pixel is
    decoded: the decompression-bomb guard. The default is Pillow's MAX_IMAGE_PIXELS. Pillow itself still refuses
    images over twice its process-wide Image.MAX_IMAGE_PIXELS; raise that too to go beyond 178,956,970."""
    max_bytes: int = 64 * 2**20
    """Skip source files larger than this many bytes (`too_large`), before decoding."""
    pad_color: tuple[int, int, int] = (255, 255, 255)
    """RGB fill around the image in pad mode (any 3-item sequence; stored as a tuple)."""

    def __post_init__(self) -> None:
        require_int(self.resolution, "process option `resolution`", 8, 4096)
        require_choice(self.resize_mode, "process option `resize_mode`", RESIZE_MODES)
        require_choice(self.image_format, "process option `image_format`", IMAGE_FORMATS)
        require_int(self.quality, "process option `quality`", 1, 100)
        require_choice(self.jpeg_subsampling, "process option `jpeg_subsampling`", tuple(JPEG_SUBSAMPLING))
        require_int(self.min_size, "process option `min_size`", 0)
        require_int(self.max_pixels, "process option `max_pixels`", 1)
        require_int(self.max_bytes, "process option `max_bytes`", 1)
        color = self.pad_color
        ok = (
            isinstance(color, (tuple, list))
            and len(color) == 3
            and all(is_int(c) and 0 <= c <= 255 for c in color)
        )
        require(ok, "process option `pad_color`", "3 integers in 0..255 (R, G, B)", color)
        # A list from YAML becomes a tuple, so options stay hashable and compare equal however they were written.
        object.__setattr__(self, "pad_color", tuple(color))


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for a shard."""

    data: bytes
    """The encoded image, in `ProcessOptions.image_format`."""
    original_size: tuple[int, int]
    """(width, height) of the source, upright (after EXIF orientation)."""
    processed_size: tuple[int, int]
    """(width, height) of `data`."""
    aspect_bucket: tuple[int, int]
    """(width, height) of the aspect-ratio bucket nearest to `original_size`; see `aspect_bucket`."""

    def metadata(self) -> dict[str, object]:
        """JSON-ready fields for the sample's .json member."""
        w, h = self.original_size
        return {
            "original_size": [w, h],
            "processed_size": list(self.processed_size),
            "aspect_ratio": round(w / h, 4),
            "aspect_bucket": list(self.aspect_bucket),
        }


def process_image(data: bytes, options: ProcessOptions) -> ProcessedImage:
    """Decode, orient, convert, resize and encode one source image; raise ImageSkip if it cannot be used.

    `data` is the source file's bytes (bytes, bytearray or memoryview; anything else is a TypeError). Same bytes
    and options give the same output bytes.
    """
    image, original_size = _decode(data, options)
    if options.resize_mode == "center_crop":
        out = resize_center_crop(image, options.resolution)
    elif options.resize_mode == "pad":
        out = resize_pad(image, options.resolution, options.pad_color)
    else:
        out = image
    # resize() copies `info`, and encoders read some of it (a source JPEG comment, a PNG tRNS colour key).
    out.info = {}
    return ProcessedImage(
        data=encode_image(out, options.image_format, options.quality, subsampling=options.jpeg_subsampling),
        original_size=original_size,
        processed_size=out.size,
        aspect_bucket=aspect_bucket(*original_size, options.resolution),
    )


def jpeg_draft_scale(width: int, height: int, options: ProcessOptions) -> int:
    """The DCT scale (1, 2, 4 or 8) a `width` x `height` JPEG is decoded at for `options`: the largest that
    still leaves enough pixels for the target, so the final resize only ever shrinks.

    center_crop needs the shorter side >= resolution, pad the longer side; "none" keeps every pixel (1).
    Both sides are unchanged by EXIF rotation, so the stored (pre-rotation) size is the right input. libjpeg's
    scaled IDCT skips most of the decode work: 512 -> 256 px is about 5x faster than a full decode, with a mean
    difference under one grey level after the resize.
    """
    if options.resize_mode == "center_crop":
        need = min(width, height)
    elif options.resize_mode == "pad":
        need = max(width, height)
    else:
        return 1
    for scale in (8, 4, 2):
        # Whole pixels only (floor), and never fewer than one row or column.
        if need // scale >= options.resolution and min(width, height) // scale >= 1:
            return scale
    return 1


# ------------------------------------------------------------------------------------------------ decoding


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully into an RGB image, upright as the camera meant it (no draft, no resize).

    Raises ImageDecodeError (a DataPrepError) for anything `process_image` would skip with default options.
    """
    try:
        image, _ = _decode(data, ProcessOptions(resize_mode="none"))
    except ImageSkip as e:
        raise ImageDecodeError(f"cannot decode image: {e}", e.reason) from e
    image.info = {}
    return image


def _decode(data: bytes, options: ProcessOptions) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB image, drafted for `options` (so possibly smaller than the source), and the source's
    upright size."""
    if not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise TypeError(f"image data must be bytes, got {type(data).__name__}")
        data = bytes(data)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some libraries set this at import; Pillow would then grey-fill truncated files instead of failing,
        # and half-grey images would go into the dataset.
        raise DataPrepError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by code imported in this process); truncated images "
            "would be stored grey-filled. Set it back to False before running the shard stage"
        )
    size = len(data)
    if size == 0:
        raise ImageSkip("empty_file", "the file has 0 bytes")
    if size > options.max_bytes:
        raise ImageSkip("too_large", f"file is {size:,} bytes, over max_bytes={options.max_bytes:,}")

    fmt = _sniff(data)
    if fmt is not None:
        _check_complete(data, fmt)
    try:
        img = Image.open(io.BytesIO(data), formats=SOURCE_FORMATS)
    except MemoryError:
        raise
    except Exception as e:
        if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise _skip_for(e, fmt) from e
        if fmt is None:
            # Whatever Pillow tripped over (a text file starting "BM" reads as a truncated bitmap), the bytes carry
            # no image signature.
            raise ImageSkip(
                "not_an_image", f"not a {'/'.join(SOURCE_FORMATS)} image; file starts with {data[:16]!r}"
            ) from e
        if isinstance(e, Image.UnidentifiedImageError):
            # The signature says PNG (say) but the header does not parse: a bad IHDR CRC, say.
            raise ImageSkip("corrupt_image", f"{fmt} header does not parse: {e}") from e
        raise _skip_for(e, fmt) from e

    # No `with img:` — closing an image frees its pixels, and `img` itself is returned when it needs no change.
    # The BytesIO holds no file handle to leak.
    fmt = img.format or fmt or "image"
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageSkip("corrupt_image", f"{fmt} header says {width}x{height} pixels")
    if width * height > options.max_pixels:
        raise ImageSkip(
            "too_many_pixels",
            f"{fmt} header says {width}x{height} = {width * height:,} pixels, over max_pixels={options.max_pixels:,}",
        )
    # Before decoding, since the shorter side is the same whichever way up the image is.
    if min(width, height) < options.min_size:
        raise ImageSkip("too_small", f"shorter side is {min(width, height)} px, below min_size={options.min_size}")
    try:
        if fmt in _JPEG_FORMATS:
            scale = jpeg_draft_scale(width, height, options)
            if scale > 1:
                # Pillow picks the largest of 8/4/2/1 <= min(w // req_w, h // req_h); asking for the floor-divided
                # size gets exactly `scale` (each quotient lies in [scale, 2 * scale)).
                img.draft("RGB", (width // scale, height // scale))
        img.load()
        orientation = _orientation(img)
        upright = img.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else img
        rgb = _to_rgb(upright)
    except MemoryError:
        raise
    except Exception as e:
        raise _skip_for(e, fmt) from e
    original_size = (height, width) if orientation in _SWAPS_AXES else (width, height)
    return rgb, original_size


def _sniff(data: bytes) -> str | None:
    """The format the file's signature claims, whether or not the rest parses; None if it looks like no image."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # "BM" alone would claim any text starting with those letters; also require a known DIB header size.
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def _check_complete(data: bytes, fmt: str) -> None:
    """Raise truncated_image where Pillow would decode a cut-off file without complaint.

    Pillow stops reading a PNG at the last IDAT it needs, so one cut after the pixel data (or inside a trailing
    chunk) loads fine; and it reads WebP through libwebp, which reports a short file only as "could not create
    decoder object". JPEGs need no check here: Pillow fails a JPEG without its end marker.
    """
    # rfind searches from the end, where IEND is: cheap when present, a full scan only for broken files.
    if fmt == "PNG" and data.rfind(_PNG_IEND) < 0:
        raise ImageSkip("truncated_image", f"PNG has no IEND chunk: the file ends early ({len(data):,} bytes)")
    if fmt == "WEBP":
        declared = int.from_bytes(data[4:8], "little") + 8  # RIFF size counts from byte 8
        if len(data) < declared:
            raise ImageSkip("truncated_image", f"WEBP file is {len(data):,} bytes, its header says {declared:,}")


def _skip_for(error: Exception, fmt: str | None) -> ImageSkip:
    """The skip for an exception Pillow raised while opening or decoding."""
    what = fmt or "image"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow's own guard (process-wide Image.MAX_IMAGE_PIXELS): raised inside Image.open, before ours.
        return ImageSkip("too_many_pixels", f"{what}: {error}")
    message = str(error)
    if isinstance(error, EOFError) or (isinstance(error, OSError) and "truncated" in message.lower()):
        # "image file is truncated (N bytes not processed)", "Truncated File Read" (a cut-off header).
        return ImageSkip("truncated_image", f"{what} file ends early: {message}")
    return ImageSkip("corrupt_image", f"{what} data does not decode: {type(error).__name__}: {message}")


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation (1-8), or None if absent or unreadable."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - any failure to parse EXIF means "no orientation", see below
        # Broken EXIF is common in the wild (cameras, editors, truncated APP1); the pixels are still good,
        # so keep the image as stored rather than skipping it.
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB: transparency composited over white, 16-bit grey scaled rather than clipped."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _GREY_16 or mode in ("I", "F"):
        return _grey_to_l(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info:
        # Fully transparent pixels often hold black or garbage RGB; composite on white so the model sees what a
        # viewer shows. "transparency" covers palette tRNS and the RGB/L colour key of PNG.
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] == 255:  # an alpha channel that is opaque everywhere: nothing to composite
            return rgba.convert("RGB")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=alpha)
        return out
    # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK JPEGs when it reads them), YCbCr, RGBX.
    return img.convert("RGB")


def _grey_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey as 8-bit L, scaled from the range the data was stored in.

    Pillow's own I -> L conversion clips at 255, which turns 16-bit mid-grey (32768) white.
    """
    if img.mode in _GREY_16:
        full = 65535.0  # PNG and TIFF 16-bit grey
        img = img.convert("I")
    else:
        # Mode I or F says nothing about the range, so infer it from the data: 0-1 floats, 8 bit, 16 bit, or
        # whatever the maximum is.
        hi = float(img.getextrema()[1])
        if img.mode == "F" and hi <= 1.0:
            full = 1.0
        elif hi <= 255:
            full = 255.0
        elif hi <= 65535:
            full = 65535.0
        else:
            full = hi
    scale = 255.0 / full
    # + 0.5: Pillow truncates when it converts I and F to L; this rounds (16-bit 32768 -> 128, not 127).
    return img.point(lambda v: v * scale + 0.5).convert("L")


# ---------------------------------------------------------------------------------------- resize / encode


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to `resolution` and crop the centre to `resolution` x `resolution`.

    Done as one resample of the centred square (`resize(box=...)`), which equals resize-then-crop but never
    resamples pixels that are cropped away. `reducing_gap` lets Pillow shrink big images by integer steps first,
    several times faster with no visible difference at the output size.
    """
    require(resolution >= 1, "resolution", ">= 1", resolution)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((resolution, resolution), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)


def resize_pad(img: Image.Image, resolution: int, pad_color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Scale the longer side to `resolution` keeping the aspect ratio, then centre it on a `resolution` x
    `resolution` canvas of `pad_color` (an RGB image in, an RGB image out)."""
    require(resolution >= 1, "resolution", ">= 1", resolution)
    w, h = img.size
    scale = resolution / max(w, h)
    size = (max(1, min(resolution, round(w * scale))), max(1, min(resolution, round(h * scale))))
    scaled = img if size == img.size else img.resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if size == (resolution, resolution):
        return scaled
    canvas = Image.new("RGB", (resolution, resolution), tuple(pad_color))
    canvas.paste(scaled, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
    return canvas


def encode_image(img: Image.Image, fmt: str, quality: int, *, subsampling: str = "4:4:4") -> bytes:
    """Encode an image as `fmt` ("jpg", "png" or "webp"); `quality` (1-100) is ignored for PNG, `subsampling`
    (see ProcessOptions.jpeg_subsampling) applies to JPEG only.

    No metadata is written, so the same pixels always give the same bytes.
    """
    require_choice(fmt, "image format", IMAGE_FORMATS)
    if img.info:
        # Encoders fall back to img.info for some chunks (JPEG comment, PNG iCCP and tRNS); write none of them.
        img = img.copy()
        img.info = {}
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING[subsampling])
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ aspect buckets


@functools.lru_cache(maxsize=32)
def aspect_buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    """All (width, height) buckets for `resolution`, sorted by aspect ratio (tall to wide).

    Sides are multiples of 64 when resolution >= 256 (8 below), so latents divide evenly at any VAE/UNet
    downsampling; each bucket's area is the nearest that step allows to resolution^2 (within ~13% at 256 px,
    closer at larger sizes); aspect ratios run up to MAX_BUCKET_ASPECT both ways. The set is mirror-symmetric
    (W x H present iff H x W is) and always holds the square nearest to resolution x resolution.
    """
    require_int(resolution, "bucket resolution", 8)
    step = 64 if resolution >= 256 else 8
    area = resolution * resolution
    square = max(step, round(resolution / step) * step)
    found = {(square, square)}

    def nearest(other: int) -> int:
        return max(step, round(area / other / step) * step)

    # From both sides: every short side with its best long side, and every long side with its best short side.
    # Either alone leaves gaps (at 256 px, long sides 384 and 448 have no short side of their own).
    pairs = [(nearest(short), short) for short in range(step, square + 1, step)]
    pairs += [(long, nearest(long)) for long in range(square + step, 2 * square + step + 1, step)]
    for long, short in pairs:
        if short < long <= MAX_BUCKET_ASPECT * short:
            found.update({(long, short), (short, long)})
    return tuple(sorted(found, key=lambda b: (b[0] / b[1], b)))


def aspect_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket of `aspect_buckets(resolution)` whose aspect ratio is nearest to width/height in log space.

    Log space so 2:1 and 1:2 are equally far from square. Ties go to the bucket whose area is nearer
    resolution^2, then the smaller (width, height), so the answer is deterministic. Square images get the square
    bucket; anything beyond MAX_BUCKET_ASPECT gets the most elongated bucket on its side.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    area = resolution * resolution
    return min(
        aspect_buckets(resolution),
        key=lambda b: (abs(math.log(b[0] / b[1]) - target), abs(b[0] * b[1] - area), b),
    )
