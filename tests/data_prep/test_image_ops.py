"""process_image on real bytes built here with Pillow: every skip reason, every mode conversion, orientation,
the JPEG draft path, resize modes, deterministic encoding, options validation and aspect buckets."""

from __future__ import annotations

import io
import pickle
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from data_prep.errors import DataPrepError
from data_prep.image_ops import (
    IMAGE_FORMATS,
    MAX_BUCKET_ASPECT,
    RESIZE_MODES,
    SKIP_REASONS,
    ImageDecodeError,
    ImageSkip,
    ProcessedImage,
    ProcessOptions,
    aspect_bucket,
    aspect_buckets,
    decode_image,
    encode_image,
    jpeg_draft_scale,
    process_image,
    resize_center_crop,
)

# ------------------------------------------------------------------------------------------------ helpers


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Gradients, a few discs and mild noise: compresses and decodes like a photo, and has detail to lose."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = rng.uniform(40, 200, 3) + (x[..., None] / w - 0.5) * rng.uniform(-120, 120, 3)
    img = img + (y[..., None] / h - 0.5) * rng.uniform(-120, 120, 3)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * min(w, h)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _decoded(result: ProcessedImage) -> Image.Image:
    img = Image.open(io.BytesIO(result.data))
    img.load()
    return img


def _skip(data: bytes, options: ProcessOptions | None = None) -> ImageSkip:
    with pytest.raises(ImageSkip) as e:
        process_image(data, options or ProcessOptions())
    assert e.value.reason in SKIP_REASONS
    return e.value


def _near(pixel, expected, tol: int = 6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs, IEND) whose IHDR claims width x height but whose IDAT holds a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 frame header patched to claim width x height."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (90, 90, 90)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _exif_jpeg(img: Image.Image, orientation: int, **params) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "JPEG", quality=95, exif=exif, **params)


def _draft_spy(monkeypatch) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Record (size before, size after) of every JpegImageFile.draft call."""
    calls: list[tuple[tuple[int, int], tuple[int, int]]] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        before = self.size
        result = real(self, mode, size)
        calls.append((before, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


# ------------------------------------------------------------------------------------------- skip reasons


def test_empty_file():
    assert _skip(b"").reason == "empty_file"


def test_too_large_is_checked_before_decoding():
    data = _encode(_photo(64, 64), "PNG")
    skip = _skip(data, ProcessOptions(max_bytes=len(data) - 1))
    assert skip.reason == "too_large" and f"{len(data):,} bytes" in skip.detail
    assert process_image(data, ProcessOptions(max_bytes=len(data))).processed_size == (256, 256)


@pytest.mark.parametrize("data", [
    b"hello, this is a text file someone named cat.jpg\n" * 20,
    b"<!doctype html><html><body>Not an image, a login page</body></html>",
    bytes(range(256)) * 4,
    b"BMW is a car maker",  # starts like a BMP; still text
])
def test_not_an_image(data):
    skip = _skip(data)
    assert skip.reason == "not_an_image"
    assert repr(data[:16]) in skip.detail  # the first bytes make an HTML error page obvious in the log


def test_formats_outside_the_allow_list_are_not_images():
    # Pillow reads PPM, but a source in it is almost surely a mistake; EPS would even run Ghostscript.
    ppm = _encode(_photo(32, 32), "PPM")
    assert Image.open(io.BytesIO(ppm)).format == "PPM"
    assert _skip(ppm).reason == "not_an_image"


def test_png_bomb_header_is_refused_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # 50000 x 50000: over twice Pillow's own limit, so Image.open itself raises DecompressionBombError.
    skip = _skip(_png_claiming(50_000, 50_000))
    assert skip.reason == "too_many_pixels"
    # 3000 x 3000 with a tight max_pixels: our header check, with the size in the detail.
    skip = _skip(_png_claiming(3000, 3000), ProcessOptions(max_pixels=1_000_000))
    assert skip.reason == "too_many_pixels" and "3000x3000 = 9,000,000 pixels" in skip.detail


def test_jpeg_bomb_header_is_refused():
    assert _skip(_jpeg_claiming(65_000, 65_000)).reason == "too_many_pixels"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_guard_between_pillows_warning_and_error():
    # 10000 x 10000 = 1e8 pixels: over the default max_pixels (Pillow's limit), under twice it, where Pillow only
    # warns. Our check skips it; with warnings as errors, Pillow's warning maps to the same reason.
    data = _png_claiming(10_000, 10_000)
    assert "10000x10000" in _skip(data).detail
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert _skip(data).reason == "too_many_pixels"


@pytest.mark.parametrize("fmt,cut", [
    ("PNG", lambda d: d[: len(d) // 2]),  # inside the pixel data
    ("PNG", lambda d: d[:-12]),  # pixels complete, IEND missing: Pillow alone would accept it
    ("JPEG", lambda d: d[: len(d) // 2]),
    ("JPEG", lambda d: d[:-2]),  # only the EOI marker missing
    ("JPEG", lambda d: d[:200]),  # inside the header
    ("WEBP", lambda d: d[: len(d) * 9 // 10]),
    ("GIF", lambda d: d[: len(d) // 2]),
])
def test_truncated_image(fmt, cut):
    data = _encode(_photo(96, 64).convert("P") if fmt == "GIF" else _photo(96, 64), fmt)
    process_image(data, ProcessOptions(resolution=32))  # the whole file is fine
    skip = _skip(cut(data), ProcessOptions(resolution=32))
    assert skip.reason == "truncated_image", skip.detail
    assert fmt in skip.detail


def test_truncated_detection_does_not_depend_on_global_pillow_state(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataPrepError, match="LOAD_TRUNCATED_IMAGES"):
        process_image(_encode(_photo(32, 32), "PNG"), ProcessOptions())


def test_module_leaves_load_truncated_images_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_jpeg_scan_data():
    data = _encode(_photo(96, 64), "JPEG", quality=90)
    sos = data.index(b"\xff\xda")
    scan = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    garbage = random.Random(1).randbytes(len(data) - scan - 2)
    skip = _skip(data[:scan] + garbage + b"\xff\xd9")
    assert skip.reason == "corrupt_image" and "JPEG" in skip.detail and "OSError" in skip.detail


def test_corrupt_png_zlib_stream():
    data = bytearray(_encode(_photo(64, 64), "PNG"))
    data[data.index(b"IDAT") + 40] ^= 0xFF
    assert _skip(bytes(data)).reason == "corrupt_image"


def test_corrupt_png_header_crc_is_corrupt_not_unknown():
    # Pillow cannot identify a PNG whose IHDR CRC is wrong; the signature still says it is a (broken) PNG.
    data = bytearray(_encode(_photo(16, 16), "PNG"))
    data[8 + 8 + 13] ^= 0xFF  # first CRC byte of IHDR
    skip = _skip(bytes(data))
    assert skip.reason == "corrupt_image" and skip.detail.startswith("PNG")


def test_too_small_uses_the_shorter_side():
    data = _encode(_photo(120, 80), "PNG")
    skip = _skip(data, ProcessOptions(min_size=81))
    assert skip.reason == "too_small" and "80 px" in skip.detail and "min_size=81" in skip.detail
    assert process_image(data, ProcessOptions(min_size=80)).original_size == (120, 80)


@pytest.mark.parametrize("bad", ["not bytes", None, 42, ["b"]])
def test_non_bytes_is_a_programming_error(bad):
    with pytest.raises(TypeError, match="must be bytes"):
        process_image(bad, ProcessOptions())


def test_bytes_like_inputs_are_accepted():
    data = _encode(_photo(40, 40), "PNG")
    expected = process_image(data, ProcessOptions(resolution=32))
    assert process_image(bytearray(data), ProcessOptions(resolution=32)) == expected
    assert process_image(memoryview(data), ProcessOptions(resolution=32)) == expected


def test_image_skip_pickles_and_rejects_unknown_reasons():
    skip = pickle.loads(pickle.dumps(ImageSkip("truncated_image", "PNG file ends early")))
    assert (skip.reason, skip.detail, str(skip)) == ("truncated_image", "PNG file ends early",
                                                     "truncated_image: PNG file ends early")
    assert not isinstance(skip, DataPrepError)
    with pytest.raises(ValueError, match="empty_file"):
        ImageSkip("decode_error", "no such reason")


# ------------------------------------------------------------------------------------------------- modes

PLAIN = ProcessOptions(resize_mode="none", image_format="png")  # lossless, no resize: pixels checked exactly


def test_cmyk_jpeg_colours():
    cmyk = Image.new("CMYK", (64, 32), (0, 255, 255, 0))  # red
    cmyk.paste((255, 0, 255, 0), (32, 0, 64, 32))  # green
    data = _encode(cmyk, "JPEG", quality=95)
    # Pillow writes CMYK JPEGs the way Photoshop does (Adobe marker, inverted); reading must undo it.
    assert "adobe" in Image.open(io.BytesIO(data)).info
    out = _decoded(process_image(data, PLAIN))
    assert out.mode == "RGB"
    assert _near(out.getpixel((8, 16)), (255, 0, 0), tol=10)
    assert _near(out.getpixel((56, 16)), (0, 255, 0), tol=10)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = Image.fromarray(np.repeat(np.array([0, 32768, 65535], np.uint16).repeat(10)[None, :], 10, axis=0))
    assert grey.mode == "I;16" and grey.size == (30, 10)
    out = _decoded(process_image(_encode(grey, "PNG"), PLAIN))
    assert _near(out.getpixel((5, 5)), (0, 0, 0), tol=0)
    assert out.getpixel((15, 5)) == (128, 128, 128)  # mid-grey stays mid-grey, not white
    assert _near(out.getpixel((25, 5)), (255, 255, 255), tol=0)


@pytest.mark.parametrize("img,expected", [
    (Image.new("I", (8, 8), 40_000), (155, 155, 155)),  # 32-bit int holding 16-bit data
    (Image.new("F", (8, 8), 0.5), (128, 128, 128)),  # float in 0..1
])
def test_int_and_float_grey_tiff(img, expected):
    out = _decoded(process_image(_encode(img, "TIFF"), PLAIN))
    assert _near(out.getpixel((4, 4)), expected, tol=1)


def test_rgba_transparent_areas_become_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black: must not come out black
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    rgba.paste((0, 0, 255, 128), (4, 0, 8, 4))
    out = _decoded(process_image(_encode(rgba, "PNG"), PLAIN))
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert out.getpixel((6, 6)) == (255, 255, 255)
    assert _near(out.getpixel((6, 1)), (127, 127, 255), tol=2)  # half-transparent blue over white


def test_la_and_webp_alpha_become_white():
    la = Image.new("LA", (8, 8), (0, 0))
    assert _decoded(process_image(_encode(la, "PNG"), PLAIN)).getpixel((3, 3)) == (255, 255, 255)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = _decoded(process_image(_encode(rgba, "WEBP", lossless=True), PLAIN))
    assert out.getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize("transparency", [1, b"\xff\x00"])  # one transparent index; per-entry alpha (tRNS)
def test_palette_with_transparency(transparency):
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 0])  # 0: red, 1: black (transparent)
    pal.paste(1, (4, 0, 8, 8))
    out = _decoded(process_image(_encode(pal, "PNG", transparency=transparency), PLAIN))
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert out.getpixel((6, 6)) == (255, 255, 255)


def test_palette_without_transparency_and_gif():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 200, 10, 200, 10])
    pal.paste(1, (4, 0, 8, 8))
    for data in (_encode(pal, "PNG"), _encode(pal, "GIF"), _encode(pal, "GIF", transparency=1)):
        out = _decoded(process_image(data, PLAIN))
        assert out.getpixel((1, 1)) == (0, 0, 200)
    assert out.getpixel((6, 6)) == (255, 255, 255)  # the GIF's transparent index


def test_rgb_png_colour_key_becomes_white_and_is_not_written():
    rgb = Image.new("RGB", (8, 8), (1, 2, 3))
    rgb.paste((0, 200, 0), (0, 0, 4, 8))
    out = _decoded(process_image(_encode(rgb, "PNG", transparency=(1, 2, 3)), PLAIN))
    assert out.getpixel((6, 6)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 200, 0)
    assert "transparency" not in out.info


def test_one_bit_and_greyscale():
    one = Image.new("1", (8, 8), 0)
    one.paste(1, (4, 0, 8, 8))
    out = _decoded(process_image(_encode(one, "PNG"), PLAIN))
    assert (out.getpixel((1, 1)), out.getpixel((6, 6))) == ((0, 0, 0), (255, 255, 255))
    out = _decoded(process_image(_encode(Image.new("L", (8, 8), 77), "PNG"), PLAIN))
    assert out.getpixel((3, 3)) == (77, 77, 77)


# ------------------------------------------------------------------------------------------- orientation


def _left_red_right_blue(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, w // 2, h))
    return img


def test_exif_orientation_6_rotates_and_swaps_size():
    # Orientation 6: display rotated 90 degrees clockwise, so the stored left half ends up on top.
    data = _exif_jpeg(_left_red_right_blue(60, 30), 6)
    result = process_image(data, ProcessOptions(resize_mode="none", image_format="png"))
    assert result.original_size == result.processed_size == (30, 60)
    out = _decoded(result)
    assert _near(out.getpixel((15, 8)), (255, 0, 0), tol=12)
    assert _near(out.getpixel((15, 52)), (0, 0, 255), tol=12)
    assert result.metadata()["aspect_ratio"] == 0.5


def test_exif_orientation_with_draft():
    data = _exif_jpeg(_left_red_right_blue(2048, 1024), 6)
    result = process_image(data, ProcessOptions(resolution=256, image_format="png"))
    assert result.original_size == (1024, 2048) and result.processed_size == (256, 256)
    out = _decoded(result)
    # Centre crop of the upright 1024x2048 image: rows 512-1536, red above the middle, blue below.
    assert _near(out.getpixel((128, 64)), (255, 0, 0), tol=12)
    assert _near(out.getpixel((128, 192)), (0, 0, 255), tol=12)


def test_broken_exif_keeps_the_image_as_stored(monkeypatch):
    broken = _encode(_left_red_right_blue(60, 30), "JPEG", exif=b"Exif\x00\x00not a tiff header at all")
    assert process_image(broken, PLAIN).original_size == (60, 30)

    def raising_getexif(self):
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(Image.Image, "getexif", raising_getexif)
    assert process_image(_exif_jpeg(_left_red_right_blue(60, 30), 6), PLAIN).original_size == (60, 30)


# -------------------------------------------------------------------------------------------------- draft


@pytest.mark.parametrize("w,h,mode,resolution,scale", [
    (2048, 2048, "center_crop", 256, 8),
    (512, 512, "center_crop", 256, 2),
    (511, 511, "center_crop", 256, 1),  # whole pixels only: 1/2 would leave 255.5
    (4000, 3000, "center_crop", 256, 8),
    (3000, 1000, "center_crop", 256, 2),  # the shorter side decides
    (3000, 1000, "pad", 256, 8),  # the longer side decides
    (100, 4000, "pad", 256, 8),
    (4000, 6, "pad", 256, 4),  # never fewer than one row
    (2048, 2048, "none", 256, 1),
    (200, 200, "center_crop", 256, 1),  # upscaling
])
def test_jpeg_draft_scale(w, h, mode, resolution, scale):
    assert jpeg_draft_scale(w, h, ProcessOptions(resolution=resolution, resize_mode=mode)) == scale


def test_big_jpeg_is_decoded_at_reduced_scale_and_looks_the_same(monkeypatch):
    data = _encode(_photo(2048, 2048, seed=3), "JPEG", quality=92)
    calls = _draft_spy(monkeypatch)
    result = process_image(data, ProcessOptions(resolution=256, image_format="png"))
    assert calls == [((2048, 2048), (256, 256))]  # libjpeg decoded 1/8 of each side
    assert result.original_size == (2048, 2048) and result.processed_size == (256, 256)

    full = Image.open(io.BytesIO(data)).convert("RGB")  # no draft: every pixel decoded
    reference = resize_center_crop(full, 256)
    assert _mean_abs_diff(_decoded(result), reference) < 2.0  # grey levels of 255


@pytest.mark.parametrize("params", [{}, {"progressive": True}, {"subsampling": 0}])
def test_draft_matches_full_decode_for_jpeg_variants(monkeypatch, params):
    data = _encode(_photo(1000, 700, seed=5), "JPEG", quality=90, **params)
    calls = _draft_spy(monkeypatch)
    result = process_image(data, ProcessOptions(resolution=128, image_format="png"))
    assert calls == [((1000, 700), (250, 175))]  # scale 4: 175 >= 128, while 1/8 would leave 87
    reference = resize_center_crop(Image.open(io.BytesIO(data)).convert("RGB"), 128)
    assert _mean_abs_diff(_decoded(result), reference) < 2.0


def test_no_draft_for_none_mode_or_non_jpeg(monkeypatch):
    calls = _draft_spy(monkeypatch)
    jpeg = _encode(_photo(600, 400), "JPEG")
    assert process_image(jpeg, ProcessOptions(resize_mode="none")).processed_size == (600, 400)
    assert process_image(_encode(_photo(600, 400), "PNG"), ProcessOptions(resolution=64)).processed_size == (64, 64)
    assert calls == []


# ------------------------------------------------------------------------------------------------ resizing


def test_center_crop_keeps_the_centre():
    # 90x30: left third red, middle green, right blue. The centred 30x30 square is all green.
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 255, 0), (30, 0, 60, 30))
    img.paste((0, 0, 255), (60, 0, 90, 30))
    out = _decoded(process_image(_encode(img, "PNG"), ProcessOptions(resolution=16, image_format="png")))
    assert out.size == (16, 16)
    r, g, b = out.getpixel((8, 8))
    assert g > 240 and r < 15 and b < 15
    assert resize_center_crop(img, 64).size == (64, 64)  # upscales too


@pytest.mark.parametrize("size,box", [((200, 100), (0, 16, 64, 48)), ((50, 100), (16, 0, 48, 64))])
def test_pad_mode(size, box):
    options = ProcessOptions(resolution=64, resize_mode="pad", image_format="png", pad_color=(0, 255, 0))
    result = process_image(_encode(Image.new("RGB", size, (255, 0, 0)), "PNG"), options)
    assert result.processed_size == (64, 64) and result.original_size == size
    out = _decoded(result)
    left, top, right, bottom = box
    assert out.getpixel(((left + right) // 2, (top + bottom) // 2)) == (255, 0, 0)
    assert out.getpixel((0, 0)) == out.getpixel((63, 63)) == (0, 255, 0)  # padding on both sides
    assert out.getpixel((left, top)) == (255, 0, 0) and out.getpixel((right - 1, bottom - 1)) == (255, 0, 0)


def test_none_mode_keeps_the_size():
    for fmt in ("PNG", "JPEG"):
        result = process_image(_encode(_photo(123, 77), fmt), ProcessOptions(resize_mode="none", resolution=64))
        assert result.original_size == result.processed_size == _decoded(result).size == (123, 77)


# ------------------------------------------------------------------------------------------------ encoding


@pytest.mark.parametrize("fmt,pil_format", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_is_deterministic_and_in_the_asked_format(fmt, pil_format):
    data = _encode(_photo(700, 500, seed=9), "JPEG")
    options = ProcessOptions(resolution=96, image_format=fmt, quality=80)
    first = process_image(data, options)
    assert process_image(data, options) == first  # same bytes, sizes and bucket
    out = _decoded(first)
    assert out.format == pil_format and out.size == (96, 96) and out.mode == "RGB"


def test_jpeg_output_is_444_without_metadata():
    exif = Image.Exif()
    exif[0x010F] = "camera maker"
    source = _encode(_photo(64, 64), "JPEG", exif=exif, comment=b"source comment",
                     icc_profile=b"\0" * 128)
    for mode in ("none", "center_crop"):
        out = _decoded(process_image(source, ProcessOptions(resolution=32, resize_mode=mode)))
        assert JpegImagePlugin.get_sampling(out) == 0  # 4:4:4
        assert not {"exif", "comment", "icc_profile"} & set(out.info)


def test_metadata():
    result = process_image(_encode(_photo(160, 90), "PNG"), ProcessOptions(resolution=64))
    assert result.metadata() == {
        "original_size": [160, 90],
        "processed_size": [64, 64],
        "aspect_ratio": 1.7778,
        "aspect_bucket": [88, 48],
    }


@pytest.mark.parametrize("fmt,pil_format", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_round_trips(fmt, pil_format):
    img = Image.new("RGB", (16, 16), (200, 40, 40))
    data = encode_image(img, fmt, 95)
    assert data == encode_image(img, fmt, 95)  # deterministic
    with Image.open(io.BytesIO(data)) as back:
        assert back.format == pil_format and back.size == (16, 16)


def test_encode_rejects_unknown_format():
    with pytest.raises(DataPrepError, match="jpg, png, webp"):
        encode_image(Image.new("RGB", (4, 4)), "gif", 90)


# ------------------------------------------------------------------------------- decode_image (older API)


def test_decode_image_errors_carry_the_skip_reason():
    data = _encode(_photo(64, 64), "PNG")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason == "truncated_image" and isinstance(e.value, DataPrepError)
    again = pickle.loads(pickle.dumps(e.value))
    assert (str(again), again.reason) == (str(e.value), "truncated_image")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(bytes(range(256)) * 4)
    assert e.value.reason == "not_an_image"


def test_decode_image_is_full_size_upright_rgb():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    img = decode_image(_encode(rgba, "PNG"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((3, 3)) == (255, 255, 255)
    assert decode_image(_exif_jpeg(Image.new("RGB", (40, 20), (10, 20, 30)), 6)).size == (20, 40)
    assert decode_image(_encode(_photo(1024, 768), "JPEG")).size == (1024, 768)  # never drafted


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("field,value,message", [
    ("resolution", 4, "`resolution` must be an integer in 8..4096, got 4"),
    ("resolution", 256.0, "`resolution` must be an integer in 8..4096, got 256.0"),
    ("resolution", True, "`resolution` must be an integer"),
    ("resize_mode", "crop", "`resize_mode` must be one of center_crop, pad, none, got 'crop'"),
    ("image_format", "JPEG", "`image_format` must be one of jpg, png, webp, got 'JPEG'"),
    ("quality", 0, "`quality` must be an integer in 1..100, got 0"),
    ("quality", 101, "`quality` must be an integer in 1..100, got 101"),
    ("min_size", -1, "`min_size` must be an integer >= 0, got -1"),
    ("max_pixels", 0, "`max_pixels` must be an integer >= 1, got 0"),
    ("max_bytes", 0, "`max_bytes` must be an integer >= 1, got 0"),
    ("pad_color", (255, 255), "`pad_color` must be 3 integers in 0..255 (R, G, B), got (255, 255)"),
    ("pad_color", (256, 0, 0), "`pad_color` must be 3 integers in 0..255"),
    ("pad_color", "white", "`pad_color` must be 3 integers in 0..255"),
])
def test_options_validation(field, value, message):
    with pytest.raises(DataPrepError) as e:
        ProcessOptions(**{field: value})
    assert message in str(e.value)


def test_options_normalise_pad_colour_and_pickle():
    options = ProcessOptions(pad_color=[0, 0, 0])  # as YAML gives it
    assert options.pad_color == (0, 0, 0) and hash(options) == hash(ProcessOptions(pad_color=(0, 0, 0)))
    assert pickle.loads(pickle.dumps(options)) == options


# ------------------------------------------------------------------------------------------- aspect buckets


@pytest.mark.parametrize("size,bucket", [
    ((1000, 1000), (256, 256)),
    ((1920, 1080), (320, 192)),  # 16:9
    ((1080, 1920), (192, 320)),  # 9:16
    ((1000, 100), (512, 128)),  # 10:1, clamped to 4:1
    ((100, 1000), (128, 512)),
    ((3, 3), (256, 256)),
])
def test_aspect_bucket_at_256(size, bucket):
    assert aspect_bucket(*size, 256) == bucket


def test_aspect_bucket_at_1024_matches_common_sdxl_buckets():
    assert aspect_bucket(1920, 1080, 1024) == (1344, 768)
    assert aspect_bucket(4000, 3000, 1024) == (1152, 896)
    assert aspect_bucket(777, 777, 1024) == (1024, 1024)


@pytest.mark.parametrize("resolution", [8, 32, 64, 100, 256, 300, 512, 768, 1024])
def test_bucket_set_properties(resolution):
    buckets = aspect_buckets(resolution)
    step = 64 if resolution >= 256 else 8
    area = resolution * resolution
    assert all(w % step == 0 and h % step == 0 for w, h in buckets)
    assert all(max(w, h) / min(w, h) <= MAX_BUCKET_ASPECT for w, h in buckets)
    assert set(buckets) == {(h, w) for w, h in buckets}  # mirror-symmetric
    square = [b for b in buckets if b[0] == b[1]]
    assert len(square) == 1 and aspect_bucket(5, 5, resolution) == square[0]
    if resolution >= 64:
        assert all(abs(w * h / area - 1) < 0.3 for w, h in buckets), buckets


def test_aspect_bucket_rejects_bad_input():
    with pytest.raises(DataPrepError, match="resolution"):
        aspect_bucket(10, 10, 4)
    with pytest.raises(ValueError, match="positive"):
        aspect_bucket(0, 10, 256)


def test_skip_reasons_are_the_documented_ones():
    assert SKIP_REASONS == ("empty_file", "too_large", "not_an_image", "too_many_pixels", "truncated_image",
                            "corrupt_image", "too_small")
    assert IMAGE_FORMATS == ("jpg", "png", "webp")
    assert RESIZE_MODES == ("center_crop", "pad", "none")


def test_jpeg_subsampling_option_is_applied_and_checked():
    from PIL import JpegImagePlugin

    from data_prep.errors import DataPrepError

    src = io.BytesIO()
    Image.effect_noise((300, 300), 60).convert("RGB").save(src, format="JPEG", quality=95)
    sizes = {}
    for name, code in (("4:4:4", 0), ("4:2:0", 2)):
        out = process_image(src.getvalue(), ProcessOptions(resolution=128, jpeg_subsampling=name))
        assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(out.data))) == code
        sizes[name] = len(out.data)
    assert sizes["4:2:0"] < sizes["4:4:4"]
    with pytest.raises(DataPrepError, match="`jpeg_subsampling` must be one of"):
        ProcessOptions(jpeg_subsampling="4:1:1")
