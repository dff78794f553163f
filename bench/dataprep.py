"""The data-prep group: ldmflow's shard stage against img2dataset on the same files, in the same run.

    make_source     N generated 512x512 photo-like JPEGs + captions, and a CSV `url,caption` of file:// URLs
    warm-up         each tool once on the first few rows, untimed (page cache, .pyc files)
    repeats         for processes in (1, 2): ldmflow, img2dataset; the next repeat starts with img2dataset,
                    so a burst of load from elsewhere on the machine lands on both tools alike
    speed           images/s = JPEG members in the tars written / wall-clock seconds; best of the repeats

The work is the same on both sides: read each file, decode, scale the shorter side to 256 and crop the
centre, encode JPEG quality 95, hash the source bytes (sha256), write WebDataset tars with the caption.
How each does it differs, and the differences are part of what is measured:
  - ldmflow decodes JPEGs at a reduced DCT scale (PIL draft) when the target still fits; 512 -> 256 is
    its best case (an exact 1/2 scale, leaving almost no resize); img2dataset decodes in full, then
    resizes with OpenCV's INTER_AREA (its default).
  - Both encode 4:2:0 chroma (OpenCV's default; ldmflow's default is 4:4:4, asked for 4:2:0 here).
  - img2dataset also writes a parquet and a stats JSON per shard and runs a logger process; ldmflow writes
    a manifest and a per-sample index. EXIF extraction is off on img2dataset's side (ldmflow stores none).

Both tools run as a subprocess of their own CLI, timed from launch to exit, so each pays its own
interpreter start, imports and worker start-up once per run, as a user does; timing our library call
inside this already-warm process would hide ours and not theirs. img2dataset's start-up is about 3 s
(imports in the parent, in each spawned worker and in its logger process), ours about 0.3 s; at the default
5000 images that is a quarter of img2dataset's time, and less at larger N, where throughput decides.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SOURCE_SIZE = 512
SOURCE_QUALITY = 90
RESOLUTION = 256
QUALITY = 95
PROCESS_COUNTS = (1, 2)
SHARDS = 10
"""Both tools write N / SHARDS samples per tar. img2dataset hands one input shard to one process, so with
a single 1000-sample shard its second process would sit idle; 10 shards keep 2 processes busy on both sides."""
IMG2DATASET_THREADS = 16
"""Reader threads per img2dataset process. Its default, 256, is for slow HTTP servers; on local file:// reads
4, 16 and 256 measured the same within noise here (2 cores), so 16: no need to start 256 threads per process."""
WARMUP_ROWS = 20
TOOL_TIMEOUT_S = 600


@dataclass
class Run:
    """One timed launch of a tool on the whole source."""

    tool: str
    processes: int
    seconds: float
    written: int

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds


@dataclass
class DataprepResult:
    """Best images/s per (tool, processes), every timed run, and why a tool was not measured."""

    samples: int
    repeats: int
    warmup_images: int
    best: dict[tuple[str, int], float] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    """tool -> one-line reason it has no numbers."""
    commands: dict[str, list[str]] = field(default_factory=dict)
    """tool -> the 2-process command line, as run (temporary paths included)."""
    warmup_s: dict[str, float] = field(default_factory=dict)
    """tool -> seconds of its untimed warm-up run on `warmup_images` images: mostly its fixed start-up cost."""
    pixel_diff: float | None = None
    """Mean |difference| in grey levels between the two tools' warm-up images of the same sources."""
    pixel_diff_images: int = 0
    busy_cores: list[float] = field(default_factory=list)
    """Cores kept busy by other processes, sampled for a second before and after the timed runs (while this
    benchmark idles): other work on the machine caps the 2-process rows."""

    def ratio(self, num: tuple[str, int], den: tuple[str, int]) -> float | None:
        if num in self.best and den in self.best:
            return self.best[num] / self.best[den]
        return None


# --- source: generated photos and a CSV of file:// URLs ------------------------------------------

_COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
            "purple": (130, 50, 160), "orange": (240, 130, 30), "white": (240, 240, 240), "black": (20, 20, 20)}
_SHAPES = ("ellipse", "rectangle", "triangle")


def synth_photo(seed: int, index: int, size: int = SOURCE_SIZE) -> tuple[Image.Image, str]:
    """A photo-like image and its caption, a pure function of (seed, index).

    Smooth gradients and low-frequency waves, soft-edged shapes and sensor-like noise: a flat-colour image
    would decode several times faster than a photo and flatter the decode-heavy side of the comparison.
    """
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(20, 235, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    pixels = c0 + (c1 - c0) * t[..., None]
    for _ in range(3):
        fx, fy, phase = rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        pixels += rng.uniform(5, 25, 3).astype(np.float32) * wave[..., None]
    pixels += rng.standard_normal((size, size, 3), dtype=np.float32) * 6
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    names = list(_COLOURS)
    described = []
    for _ in range(int(rng.integers(2, 6))):
        colour, shape = names[int(rng.integers(len(names)))], _SHAPES[int(rng.integers(len(_SHAPES)))]
        fill = _COLOURS[colour] + (int(rng.integers(160, 256)),)
        x0, y0 = rng.uniform(-0.1, 0.9, 2) * size
        w, h = rng.uniform(0.1, 0.5, 2) * size
        if shape == "ellipse":
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif shape == "rectangle":
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            draw.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=fill)
        described.append(f"a {colour} {shape}")
    overlay = overlay.filter(ImageFilter.GaussianBlur(1.5))
    image.paste(overlay, (0, 0), overlay)
    return image, " and ".join(described) + " over a soft gradient"


def _write_photo(args: tuple[Path, int, int]) -> tuple[str, str]:
    folder, seed, index = args
    image, caption = synth_photo(seed, index)
    path = folder / f"{index:06d}.jpg"
    image.save(path, format="JPEG", quality=SOURCE_QUALITY)
    return path.resolve().as_uri(), caption


def make_source(folder: Path, n: int, seed: int = 0) -> Path:
    """Write n photos to `folder/images` and return `folder/source.csv` (`url,caption`, file:// URLs)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rows = list(pool.map(_write_photo, [(images, seed, i) for i in range(n)], chunksize=32))
    return _write_csv(folder / "source.csv", rows)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    return path


def _head_csv(csv_path: Path, rows: int, out: Path) -> Path:
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        next(reader)
        head = [tuple(r) for _, r in zip(range(rows), reader)]
    return _write_csv(out, head)


def _split_csv(csv_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """The source CSV's rows in two halves, for the machine-ceiling run."""
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        next(reader)
        rows = [tuple(r) for r in reader]
    half = len(rows) // 2
    return _write_csv(out_dir / "half-1.csv", rows[:half]), _write_csv(out_dir / "half-2.csv", rows[half:])


# --- the two tools -----------------------------------------------------------------------------------


def ldmflow_command(csv_path: Path, out: Path, processes: int, samples_per_shard: int) -> list[str]:
    ldmflow = Path(sys.executable).parent / "ldmflow"
    return [str(ldmflow), "shard", "--source", str(csv_path), "--output", str(out),
            "--url-column", "url", "--caption-column", "caption",
            "--resolution", str(RESOLUTION), "--resize-mode", "center_crop",
            # The same output as img2dataset's OpenCV encoder: quality 95 with 4:2:0 chroma (ours defaults to 4:4:4).
            "--image-format", "jpg", "--quality", str(QUALITY), "--jpeg-subsampling", "4:2:0",
            "--samples-per-shard", str(samples_per_shard),
            "--processes", str(processes), "--overwrite", "--no-progress"]


def img2dataset_command(python: Path, csv_path: Path, out: Path, processes: int,
                        samples_per_shard: int) -> list[str]:
    # extract_exif off: ours stores no EXIF, so parsing it would be extra work on their side only.
    # compute_hash stays sha256 (ours hashes the source bytes too); downscale interpolation stays at
    # its default, area, which is what img2dataset users get.
    return [str(python.parent / "img2dataset"), "--url_list", str(csv_path), "--input_format", "csv",
            "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
            "--output_folder", str(out), "--image_size", str(RESOLUTION), "--resize_mode", "center_crop",
            "--encode_format", "jpg", "--encode_quality", str(QUALITY),
            "--number_sample_per_shard", str(samples_per_shard), "--processes_count", str(processes),
            "--thread_count", str(IMG2DATASET_THREADS), "--distributor", "multiprocessing",
            "--extract_exif", "False", "--compute_hash", "sha256", "--disable_all_reencoding", "False",
            "--enable_wandb", "False", "--retries", "0", "--timeout", "10"]


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    # albumentations otherwise fetches pypi.org/pypi/albumentations/json on import (up to a 2 s timeout): a
    # network round trip inside img2dataset's timed start-up, and each spawned worker's, unrelated to its speed.
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return env


class ToolFailed(RuntimeError):
    """One tool could not do the benchmark's work; the other is still measured."""


class Timed(NamedTuple):
    seconds: float
    written: int


def timed_run(tool: str, cmd: list[str], out: Path) -> Timed:
    """Run `cmd` into a fresh `out`, time it from launch to exit, and count the images it wrote."""
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_tool_env(), timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ToolFailed(f"{tool} ran past {TOOL_TIMEOUT_S}s") from e
    seconds = time.perf_counter() - start
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    if done.returncode != 0:
        raise ToolFailed(f"{tool} exited {done.returncode}: {tail}")
    written = count_images(out)
    if written == 0:
        raise ToolFailed(f"{tool} wrote no images into {out}: {tail}")
    return Timed(seconds, written)


def count_images(out: Path) -> int:
    """JPEG members in every tar under `out`, counted the same way for both tools."""
    total = 0
    for tar_path in sorted(out.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            total += sum(1 for m in tar if m.isfile() and m.name.endswith(".jpg"))
    return total


def check_output(tool: str, out: Path) -> None:
    """The first stored image must be a RESOLUTION-square JPEG: a tool doing less work is no baseline."""
    for tar_path in sorted(out.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    if image.format != "JPEG" or image.size != (RESOLUTION, RESOLUTION):
                        raise ToolFailed(f"{tool} stored a {image.format} of {image.size}, "
                                         f"not a {RESOLUTION}x{RESOLUTION} JPEG")
                    return
    raise ToolFailed(f"{tool} wrote no .jpg members under {out}")


def images_by_url(out: Path) -> dict[str, bytes]:
    """Stored JPEG bytes by source URL: `url` in img2dataset's per-sample JSON, `source_id` in ours."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile() and "." in member.name:
                    key, ext = member.name.rsplit(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    found = {}
    for sample in samples.values():
        if "jpg" in sample and "json" in sample:
            meta = json.loads(sample["json"])
            found[meta.get("url") or meta.get("source_id")] = sample["jpg"]
    return found


def mean_abs_diff(a: Path, b: Path) -> tuple[float, int]:
    """Mean |pixel difference| (0-255) between the two outputs' images of the same sources, and how many matched.

    A check that both tools did the same work: different crops or sizes would show tens of grey levels.
    """
    left, right = images_by_url(a), images_by_url(b)
    diffs = []
    for url in sorted(left.keys() & right.keys()):
        x, y = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) for data in (left[url], right[url]))
        diffs.append(float(np.abs(x - y).mean()) if x.shape == y.shape else 255.0)
    return (float(np.mean(diffs)) if diffs else math.nan), len(diffs)


# --- the group -----------------------------------------------------------------------------------------


def bench_dataprep(work: Path, n: int, *, repeats: int = 2, seed: int = 0,
                   root: Path | None = None) -> DataprepResult:
    """Measure both tools at 1 and 2 processes on n generated photos; see the module docstring.

    A tool that cannot run (img2dataset venv not buildable, a command failing) is listed in
    `unavailable` with the reason, and the other tool is still measured.
    """
    from bench.img2dataset_env import Img2datasetEnvError, ensure_img2dataset_venv

    root = root or Path(__file__).resolve().parents[1]
    work = work / "dataprep"
    result = DataprepResult(samples=n, repeats=repeats, warmup_images=min(WARMUP_ROWS, n))
    result.busy_cores.append(busy_cores())
    print(f"dataprep: generating {n} {SOURCE_SIZE}x{SOURCE_SIZE} JPEGs", flush=True)
    csv_path = make_source(work / "source", n, seed)
    warm_csv = _head_csv(csv_path, WARMUP_ROWS, work / "warmup.csv")
    halves = _split_csv(csv_path, work)
    per_shard = max(1, math.ceil(n / SHARDS))

    commands: dict[str, Callable[[Path, Path, int], list[str]]] = {
        "ldmflow": lambda src, out, p: ldmflow_command(src, out, p, per_shard)}
    try:
        python = ensure_img2dataset_venv(root)
        commands["img2dataset"] = lambda src, out, p: img2dataset_command(python, src, out, p, per_shard)
    except Img2datasetEnvError as e:
        result.unavailable["img2dataset"] = str(e)

    # Warm-up: the first launch of a venv reads its files from disk and may compile .pyc files.
    for tool, command in commands.items():
        result.commands[tool] = command(csv_path, work / f"out-{tool}", PROCESS_COUNTS[-1])
        out = work / f"warmup-{tool}"
        try:
            result.warmup_s[tool] = timed_run(tool, command(warm_csv, out, 1), out).seconds
            check_output(tool, out)
        except ToolFailed as e:
            result.unavailable[tool] = str(e)
    if not result.unavailable:
        result.pixel_diff, result.pixel_diff_images = mean_abs_diff(work / "warmup-ldmflow",
                                                                    work / "warmup-img2dataset")

    for repeat in range(repeats):
        order = list(commands) if repeat % 2 == 0 else list(reversed(commands))
        for processes in PROCESS_COUNTS:
            for tool in order:
                if tool not in result.unavailable:
                    _measure(result, tool, commands[tool], csv_path, work / f"out-{tool}", processes)
        if "ldmflow" not in result.unavailable:
            _measure_ceiling(result, commands["ldmflow"], halves, work)
    result.busy_cores.append(busy_cores())
    result.best = {k: v for k, v in result.best.items() if k[0] not in result.unavailable}
    return result


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores the whole machine keeps busy over `seconds` (Linux /proc/stat; NaN elsewhere).

    Called while this process sleeps, so it measures everyone else. A load average would not do: it still
    holds this benchmark's own earlier groups for minutes.
    """
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return math.nan
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


CEILING = "2 x ldmflow 1 proc on halves"
"""Two independent one-process runs at once, each on half the source: no shared pool, no shared parent,
so their speed over the whole source is what this machine allows two processes; a parallel run can at
best match it. It tells whether ldmflow's 2-process scaling is limited by ldmflow or by the machine."""


def _measure_ceiling(result: DataprepResult, command: Callable[[Path, Path, int], list[str]],
                     halves: tuple[Path, Path], work: Path) -> None:
    outs = [work / f"out-half-{i}" for i in (1, 2)]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    procs = [subprocess.Popen(command(src, out, 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=_tool_env()) for src, out in zip(halves, outs)]
    codes = [p.wait(timeout=TOOL_TIMEOUT_S) for p in procs]
    seconds = time.perf_counter() - start
    written = sum(count_images(out) for out in outs) if codes == [0, 0] else 0
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    if written == 0:
        result.unavailable[CEILING] = f"exit codes {codes}"
        return
    run = Run(CEILING, 2, seconds, written)
    result.runs.append(run)
    result.best[(CEILING, 2)] = max(result.best.get((CEILING, 2), 0.0), run.images_per_s)
    print(f"dataprep: {CEILING}: {written} images in {seconds:.2f}s ({run.images_per_s:.1f}/s)", flush=True)


def _measure(result: DataprepResult, tool: str, command: Callable[[Path, Path, int], list[str]],
             csv_path: Path, out: Path, processes: int) -> None:
    try:
        seconds, written = timed_run(tool, command(csv_path, out, processes), out)
    except ToolFailed as e:
        result.unavailable[tool] = str(e)
        return
    finally:
        shutil.rmtree(out, ignore_errors=True)
    run = Run(tool, processes, seconds, written)
    result.runs.append(run)
    key = (tool, processes)
    result.best[key] = max(result.best.get(key, 0.0), run.images_per_s)
    missing = f"; {result.samples - written} of {result.samples} not written" if written != result.samples else ""
    print(f"dataprep: {tool} {processes} proc{'s' if processes > 1 else ''}: {written} images in {seconds:.2f}s "
          f"({run.images_per_s:.1f}/s{missing})", flush=True)
