"""The URL group: `ldmflow shard` on a table of 100k URL rows served by a local HTTP server, with a time cap.

    server    a ThreadingHTTPServer on 127.0.0.1 in this process (HTTP/1.1, keep-alive), GET /img/<i>.jpg:
              one of BASE_IMAGES small photo-like JPEGs with a JPEG comment naming i, so every row's bytes
              (and sha256) differ and de-duplication keeps them all, at the cost of one decode each
    table     `url,caption`, one distinct URL per row
    run       `ldmflow shard --allow-private-hosts --processes 2` as its own CLI (loopback is a private
              host), timed from launch to exit, its process tree killed at the cap
    sampled   every SAMPLE_S from outside, each process of the CLI's tree (the CLI and its pool's workers):
              resident memory and open file descriptors

What it answers: does a long URL run stay flat? Before the one-pool-per-process fetcher, every task
of a worker started a 16-thread pool whose sessions were never closed, so a worker's descriptors grew
with every task until connections failed. Each process's descriptors are reported at its first sample,
once the run is warm (WARM_FRACTION of the wall time in: sessions and their connections opened), at
its last sample and at most; the peak resident memory is per process and summed over the tree (pages
a fork shares are counted in each process, so the sum overstates what the tree holds).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

ROWS = 100_000
PROCESSES = 2
BASE_IMAGES = 64
IMAGE_SIZE = 96
RESOLUTION = 64
SAMPLES_PER_SHARD = 1000
CAP_S = 900
"""Time cap of the shard run: at a few thousand rows/s 100k rows take a minute or two; a run past the cap
is killed and reported as not measured."""
SAMPLE_S = 0.2
WARM_FRACTION = 0.1


# --- the server ------------------------------------------------------------------------------------


def _with_comment(jpeg: bytes, text: str) -> bytes:
    """`jpeg` with a COM segment holding `text` right after its SOI marker: other bytes, the same pixels."""
    payload = text.encode("ascii")
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


class ImageServer(ThreadingHTTPServer):
    """GET /img/<i>.jpg -> a distinct JPEG per i; counts the requests it answered."""

    daemon_threads = True  # keep-alive connections hold a thread each; none may outlive the benchmark

    def __init__(self) -> None:
        from bench.dataprep import synth_photo

        self.images = []
        for i in range(BASE_IMAGES):
            buffer = BytesIO()
            synth_photo(1, i, size=IMAGE_SIZE)[0].save(buffer, format="JPEG", quality=90)
            self.images.append(buffer.getvalue())
        self._served = itertools.count()
        self.served = 0
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="bench-image-server", daemon=True)

    def body(self, index: int) -> bytes:
        self.served = next(self._served) + 1  # itertools.count is atomic under the GIL; += on an int is not
        return _with_comment(self.images[index % BASE_IMAGES], f"row {index}")

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/img/{index}.jpg"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as image hosts serve
    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        match = re.fullmatch(r"/img/(\d+)\.jpg", self.path)
        if match is None:
            self.send_error(404)
            return
        body = self.server.body(int(match.group(1)))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # 100k access-log lines on stderr would cost more than serving them


# --- sampling the shard CLI's process tree -----------------------------------------------------------


@dataclass
class ProcessTrace:
    """One process of the tree over the run: descriptors and resident memory at each sample it was seen in."""

    pid: int
    role: str
    """"cli" (the `ldmflow shard` process) or "worker"."""
    times: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    """CPU seconds (user + system) it had used at its last sample."""

    def fds_at(self, t: float) -> int:
        """Descriptors at the first sample at or after `t` (the last one if none)."""
        return next((n for s, n in zip(self.times, self.fds) if s >= t), self.fds[-1])

    def summary(self, warm_t: float) -> dict:
        return {"pid": self.pid, "role": self.role, "samples": len(self.times), "fds_first": self.fds[0],
                "fds_warm": self.fds_at(warm_t), "fds_last": self.fds[-1], "fds_max": max(self.fds),
                "peak_rss_bytes": max(self.rss), "cpu_s": round(self.cpu_s, 1)}


def sample_tree(pid: int, traces: dict[int, ProcessTrace], tree_rss: list[int], start: float) -> None:
    """One sample of `pid` and its descendants into `traces`; the tree's summed RSS into `tree_rss`."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    now, total = time.perf_counter() - start, 0
    for proc in procs:
        try:
            with proc.oneshot():
                fds, rss, cpu = proc.num_fds(), proc.memory_info().rss, proc.cpu_times()
        except psutil.NoSuchProcess:  # ended between the listing and the read
            continue
        if fds == 0:  # exiting (its descriptors already closed by the kernel): not the end of its work
            continue
        trace = traces.setdefault(proc.pid, ProcessTrace(proc.pid, "cli" if proc.pid == pid else "worker"))
        trace.times.append(now)
        trace.fds.append(fds)
        trace.rss.append(rss)
        trace.cpu_s = cpu.user + cpu.system
        total += rss
    tree_rss.append(total)


# --- the group ---------------------------------------------------------------------------------------


@dataclass
class UrlResult:
    rows: int
    processes: int
    cap_s: int
    seconds: float = float("nan")
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    served: int = 0
    """Requests the server answered: rows + retries."""
    peak_tree_rss_bytes: int = 0
    processes_seen: list[dict] = field(default_factory=list)
    """ProcessTrace.summary() of each process of the tree, the CLI first."""
    server_cpu_s: float = 0.0
    """CPU seconds of this process (the server's threads and the sampler) over the run."""
    busy_cores_other: list[float] = field(default_factory=list)
    """Cores other processes kept busy just before and just after the run (bench.dataprep.busy_cores)."""
    command: list[str] = field(default_factory=list)
    unavailable: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds == self.seconds and self.seconds > 0 else float("nan")


def shard_command(table: Path, out: Path) -> list[str]:
    ldmflow = Path(sys.executable).parent / "ldmflow"
    return [str(ldmflow), "shard", "--source", str(table), "--output", str(out), "--url-column", "url",
            "--caption-column", "caption", "--resolution", str(RESOLUTION), "--image-format", "jpg",
            "--samples-per-shard", str(SAMPLES_PER_SHARD), "--processes", str(PROCESSES),
            "--allow-private-hosts", "--overwrite", "--no-progress"]


def bench_urls(work: Path, rows: int = ROWS, cap_s: int = CAP_S) -> UrlResult:
    """Shard `rows` URL rows from a local server; see the module docstring."""
    from bench.dataprep import busy_cores
    from data_prep.dataset import read_dataset

    work = work / "urls"
    work.mkdir(parents=True, exist_ok=True)
    result = UrlResult(rows=rows, processes=PROCESSES, cap_s=cap_s)
    with ImageServer() as server:
        table = work / "urls.csv"
        with table.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            writer.writerows((server.url(i), f"test photo number {i} from a local server") for i in range(rows))
        out = work / "shards"
        result.command = shard_command(table, out)
        print(f"urls: sharding {rows} URL rows from {server.url(0)} ...", flush=True)
        traces: dict[int, ProcessTrace] = {}
        tree_rss: list[int] = []
        result.busy_cores_other.append(round(busy_cores(), 2))
        cpu_start, start = time.process_time(), time.perf_counter()
        proc = subprocess.Popen(result.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # a full pipe would block it
        reader.start()
        while proc.poll() is None and time.perf_counter() - start < cap_s:
            sample_tree(proc.pid, traces, tree_rss, start)
            time.sleep(SAMPLE_S)
        seconds, result.server_cpu_s = time.perf_counter() - start, round(time.process_time() - cpu_start, 1)
        if proc.poll() is None:
            _kill_tree(proc)
            result.unavailable = f"ran past the cap of {cap_s} s"
        reader.join(timeout=10)
        result.served = server.served
        result.busy_cores_other.append(round(busy_cores(), 2))
    result.peak_tree_rss_bytes = max(tree_rss, default=0)
    warm_t = seconds * WARM_FRACTION
    result.processes_seen = [t.summary(warm_t) for t in sorted(traces.values(), key=lambda t: (t.role != "cli", t.pid))]
    if not result.unavailable and proc.returncode != 0:
        result.unavailable = f"ldmflow shard exited {proc.returncode}: {' | '.join(''.join(output).splitlines()[-3:])}"
    if not result.unavailable:
        part = read_dataset(str(out)).parts[-1].manifest
        result.seconds, result.written, result.skipped = seconds, part.total_samples, dict(part.skipped)
        print(f"urls: {result.written} written of {rows} in {seconds:.1f}s ({result.rows_per_s:.0f} rows/s)",
              flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _kill_tree(proc: subprocess.Popen) -> None:
    """End the CLI and its pool's workers (children first: a killed parent leaves them running)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.kill()
    proc.wait()
