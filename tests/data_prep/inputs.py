"""Real inputs for the shard stage: photo-like JPEGs and PNGs, a decompression bomb, corrupt bytes."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth gradient with a bright disc and mild noise: decodes and compresses like a photo."""
    rng = np.random.default_rng(seed)
    w, h = size
    # One row of x and one column of y, broadcast: the same float operations per pixel (the same bytes) as
    # full h x w coordinate grids, without building and multiplying them (the killed-run tests make
    # hundreds of 512x512 photos; the grids were most of their time).
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-0.5, 0.5, (2, 3))
    img = (base + (x[..., None] * slope[0] * 256 / w)) + y[..., None] * slope[1] * 256 / h
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.1, 0.3) * min(w, h)
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8), "RGB")


def jpeg_bytes(size: tuple[int, int] = (96, 80), seed: int = 0, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    photo(size, seed).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    buf = io.BytesIO()
    photo(size, seed).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corrupt_jpeg() -> bytes:
    """A real JPEG whose Huffman table is overwritten with garbage: it parses, then fails to decode.

    (Garbage in the scan data alone is not enough: libjpeg repairs it with a warning.)"""
    good = jpeg_bytes((64, 64), seed=99)
    dht = good.index(b"\xff\xc4")
    return good[: dht + 4] + bytes(range(200, 250)) + good[dht + 54:]


def write_folder(root: Path, n: int, *, seed: int = 0, size: tuple[int, int] = (96, 80), start: int = 0) -> list[str]:
    """n captioned photo JPEGs img-XXXX.jpg + .txt under root; returns their names."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        name = f"img-{i:04d}.jpg"
        (root / name).write_bytes(jpeg_bytes(size, seed=seed * 100003 + i))
        (root / f"img-{i:04d}.txt").write_text(f"photo number {i}\n", encoding="utf-8")
        names.append(name)
    return names




def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_without_root_powers(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`ldmflow ARGS` in a child process that obeys file permission bits even when tests run as root.

    Root ignores permissions through the CAP_DAC_* capabilities, so the child drops them from its
    bounding set (util-linux `setpriv`); a non-root user needs nothing. Skips the test, with the reason,
    where neither works.
    """
    import pytest

    command = [sys.executable, "-m", "pipelines.cli", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and util-linux `setpriv` is missing: cannot test permission errors")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def kill_cli_when(args: list[str], cwd: Path, ready, timeout: float = 90) -> None:
    """Run `ldmflow ARGS` in a child process and SIGKILL it as soon as `ready()` is true.

    Fails the test if the child exits first or `ready()` stays false for `timeout` seconds.
    """
    import signal
    import tempfile
    import time

    import pytest

    # Output to a file, not a pipe that nobody reads while waiting (a full pipe would block the child).
    output = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, stdout=output,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                output.seek(0)
                pytest.fail(f"the run ended before it could be killed:\n{output.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach the point to kill it within {timeout} s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        output.close()
        if proc.poll() is None:
            proc.kill()
