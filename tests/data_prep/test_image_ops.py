"""Image decode/resize/encode on real bytes: corrupt input is detected, geometry is exact."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from data_prep.errors import DataPrepError
from data_prep.image_ops import ImageDecodeError, decode_image, encode_image, resize_center_crop


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    return Image.frombytes(mode, (w, h), bytes((i * 7919) % 251 for i in range(w * h * len(mode))))


def test_truncated_png_is_a_decode_error():
    data = _png(_noise(64, 64))
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_random_bytes_are_a_decode_error():
    with pytest.raises(ImageDecodeError) as e:
        decode_image(bytes(range(256)) * 4)
    assert isinstance(e.value, DataPrepError)


def test_decode_gives_rgb_with_transparent_areas_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    img = decode_image(_png(rgba))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((3, 3)) == (255, 255, 255)


def test_decode_applies_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 20, 30)).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)


def test_resize_center_crop_keeps_the_centre():
    # 90x30: left third red, middle green, right blue. The centred 30x30 square is all green.
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 255, 0), (30, 0, 60, 30))
    img.paste((0, 0, 255), (60, 0, 90, 30))
    out = resize_center_crop(img, 16)
    assert out.size == (16, 16)
    r, g, b = out.getpixel((8, 8))
    assert g > 240 and r < 15 and b < 15
    assert resize_center_crop(_noise(20, 50), 64).size == (64, 64)  # upscales too


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
