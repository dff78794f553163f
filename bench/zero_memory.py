"""ZeRO memory and scale (issue 15, item 5): what ZeRO-3 saves per rank, the largest UNet that still takes
optimizer steps under a memory budget, and the sd15 preset's UNet training on this machine.

Every measurement is one *trial*: two fresh processes (rank 0 and 1 of a torch.distributed gloo group on
loopback) that build a UNet exactly as a training worker does (training.models.assembly.build_unet inside
training.runtime.engine.module_init, i.e. deepspeed.zero.Init under train.deepspeed.zero_init), wrap it in
the project's engine (training.runtime.engine.build_engine: DeepSpeed with torch AdamW) and take a few
optimizer steps of the diffusion loss on random latents and text states. Plain processes rather than Ray
Train workers: Ray would start the same engine through the same functions, but adds its own processes
and per-worker object-store and log threads to what each rank holds, which is noise for a memory figure.

What is measured, and why: there is no CUDA allocator on CPU, so a rank's peak is its process's peak
resident set, VmHWM in /proc/<pid>/status (the kernel's high-water mark of resident pages, so no spike
between samples is missed), read by the rank itself after its last step. Each trial uses fresh
processes, so one trial's peak never carries another's. The figure includes what every rank holds
before any model exists (Python, torch, DeepSpeed, diffusers, the gloo group: "baseline", reported
apart) because that is what a rank really costs; the ratios are of the whole peak.

Memory safety on a shared machine: a watchdog in this process reads each rank's VmRSS every 20 ms and
kills both ranks (its own children, by pid) the moment one passes the trial's budget; a trial that ends
with a VmHWM over budget (a spike between two reads) counts as not fitting too. Before a trial starts,
the machine must have that much memory available (MemAvailable), or the trial waits, then is skipped
with a note.

Run alone (about 15 minutes on 2 cores; it needs up to ~16 GiB free at once):
  flock /tmp/ldmflow-heavy.lock .venv/bin/python -m bench.run --zero-only
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

WORLD_SIZE = 2
"""Ranks per trial: the issue's figures are for 2 ranks."""

MIN_PARAMS_RATIO_MODEL = 300_000_000
"""The ZeRO-3 vs ZeRO-0 peak comparison is for a UNet of at least this many parameters (issue 15)."""


# --- trials ------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Trial:
    """One 2-rank run: a UNet of SD 1.5's architecture (configs/sd15.yaml) at base width `width`
    (block_out_channels [w, 2w, 4w, 4w]; None: the preset's own 320, i.e. SD 1.5's UNet), trained for
    `steps` optimizer steps with the given DeepSpeed settings."""

    name: str
    width: int | None = None
    stage: int = 0
    zero_init: bool = False
    offload_optimizer: str = "none"
    offload_param: str = "none"
    nvme_path: str | None = None
    precision: str = "fp32"
    activation_checkpointing: bool = False
    steps: int = 3
    batch_size: int = 1
    resolution: int = 64
    """Pixels; the UNet sees resolution / 8 latents (SD's VAE factor): 64 px is the smallest SD's four
    UNet levels take, so activations stay small beside the parameters and optimizer state."""
    text_tokens: int = 8
    """Length of the random text states the UNet cross-attends to (SD: 77 CLIP tokens)."""
    extra: tuple[str, ...] = ()
    """More overrides (e.g. train.deepspeed.extra.zero_optimization.sub_group_size=...)."""

    def overrides(self) -> list[str]:
        """Overrides of configs/sd15.yaml that make this trial's run config."""
        out = [f"model.resolution={self.resolution}", f"train.zero_stage={self.stage}",
               f"train.precision={self.precision}", "train.use_gpu=false", f"train.batch_size={self.batch_size}",
               "train.grad_accum=1", "train.warmup_steps=0", f"train.num_workers={WORLD_SIZE}",
               "train.cpus_per_worker=1", "train.ema.enabled=false",
               f"train.deepspeed.zero_init={str(self.zero_init).lower()}",
               f"train.deepspeed.offload_optimizer={self.offload_optimizer}",
               f"train.deepspeed.offload_param={self.offload_param}",
               f"train.deepspeed.activation_checkpointing={str(self.activation_checkpointing).lower()}"]
        if self.precision != "fp32":
            out.append("train.allow_cpu_half_precision=true")
        if self.nvme_path:
            out.append(f"train.deepspeed.nvme_path={self.nvme_path}")
        if self.width is not None:
            w = self.width
            # 16 groups (SD: 32) so that widths step by 16, not 32: a finer search for the largest UNet.
            out += [f"model.unet.block_out_channels=[{w},{2 * w},{4 * w},{4 * w}]", "model.unet.norm_num_groups=16"]
        return out + list(self.extra)


@dataclass
class RankResult:
    rank: int
    params: int = 0
    """Parameters of the whole UNet (under zero.Init: the sum of each parameter's full size, ds_numel)."""
    baseline_bytes: int = 0
    """VmHWM once torch, DeepSpeed and diffusers are imported and the gloo group is up: before any model."""
    built_bytes: int = 0
    """VmHWM once the engine is built, before the first step."""
    peak_bytes: int = 0
    """VmHWM after the last step: the rank's peak resident memory over the whole trial."""
    steps_taken: int = 0
    """The engine's global_steps at the end (optimizer steps applied)."""
    skipped_steps: int = 0
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    phase_s: dict[str, float] = field(default_factory=dict)
    """Seconds of each phase before the steps: imports and group, the UNet's build, the engine's."""


@dataclass
class TrialResult:
    trial: Trial
    ok: bool
    """Every rank took every optimizer step (and, with a budget, stayed within it)."""
    reason: str = ""
    budget_bytes: int | None = None
    ranks: list[RankResult] = field(default_factory=list)
    watchdog_peak_bytes: int = 0
    """The highest VmRSS the watchdog saw on any rank (a lower bound of the peak when it killed them)."""
    killed_params: int = 0
    """The UNet's parameters as rank 0 reported them before the watchdog killed it (0: not built yet)."""
    wall_s: float = 0.0

    @property
    def params(self) -> int:
        return max((r.params for r in self.ranks), default=self.killed_params)

    @property
    def peak_bytes(self) -> int:
        """The larger rank's peak (rank 0 holds a little more: it logs)."""
        return max((r.peak_bytes for r in self.ranks), default=self.watchdog_peak_bytes)

    @property
    def step_s(self) -> float:
        """Median seconds per step after the first (warm-up: first gathers, allocator growth), slowest rank."""
        times = [sorted(r.step_s[1:] or r.step_s) for r in self.ranks if r.step_s]
        if not times:
            return math.nan
        return max(t[len(t) // 2] for t in times)

    def to_dict(self) -> dict:
        return asdict(self) | {"params": self.params, "peak_bytes": self.peak_bytes, "step_s_median": self.step_s}


def _status_kib(pid: int | str, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_for_memory(need_bytes: int, wait_s: float) -> bool:
    """True once MemAvailable >= need_bytes (polling up to wait_s): other work on a shared machine finishes."""
    deadline = time.monotonic() + wait_s
    while mem_available_bytes() < need_bytes:
        if time.monotonic() > deadline:
            return False
        time.sleep(2)
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _swap_dir(parent: str | None):
    if parent is None:
        yield None
        return
    swap = tempfile.mkdtemp(prefix="ldmflow-zeromem-swap-", dir=parent)
    try:
        yield swap
    finally:
        shutil.rmtree(swap, ignore_errors=True)


def run_trial(trial: Trial, *, budget_bytes: int | None = None, need_bytes: int | None = None,
              timeout_s: float = 900, wait_s: float = 300, mmap_threshold: int | None = 1 << 20) -> TrialResult:
    """Run `trial` on WORLD_SIZE fresh processes. `budget_bytes`: the per-rank limit (the watchdog kills
    both ranks past it; a peak over it after the fact also fails the trial). `need_bytes`: what must be
    available on the machine before it starts (default: budget x ranks)."""
    need = need_bytes if need_bytes is not None else (budget_bytes * WORLD_SIZE if budget_bytes else 0)
    if need and not wait_for_memory(need, wait_s):
        return TrialResult(trial, ok=False, budget_bytes=budget_bytes,
                           reason=f"not run: {need / GIB:.1f} GiB not available within {wait_s:.0f} s "
                                  f"({mem_available_bytes() / GIB:.1f} GiB)")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ldmflow-zeromem-") as tmp, _swap_dir(trial.nvme_path) as swap:
        spec = Path(tmp) / "trial.json"
        # Each trial swaps into a folder of its own, removed after it (an sd15 trial writes ~13 GB there).
        spec.write_text(json.dumps(asdict(trial) | {"nvme_path": swap}))
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD_SIZE),
                   LOCAL_WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        if mmap_threshold:
            # glibc raises its mmap threshold to the size of each large block freed, so after the first
            # few gathered-then-released ZeRO-3 parameters every later one comes from the heap, whose
            # freed pages stay resident: the process keeps what it gathered. A fixed threshold turns
            # that off (large blocks are mmapped and go back to the OS when freed).
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        procs = []
        for rank in range(WORLD_SIZE):
            env_r = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
            log = open(Path(tmp) / f"rank{rank}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.zero_memory", "--worker", str(spec),
                                           str(Path(tmp) / f"rank{rank}.json")],
                                          cwd=ROOT, env=env_r, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        killed = ""
        seen = built = 0
        while any(p.poll() is None for p in procs):
            rss = [_status_kib(p.pid, "VmRSS") * 1024 for p in procs if p.poll() is None]
            seen = max([seen, *rss])
            if budget_bytes is not None and rss and max(rss) > budget_bytes:
                killed = f"over budget: a rank reached {max(rss) / GIB:.2f} GiB > {budget_bytes / GIB:.2f} GiB"
            elif time.monotonic() - start > timeout_s:
                killed = f"timed out after {timeout_s:.0f} s"
            if killed:
                where = Path(tmp) / "rank0.json.progress"
                if where.exists():
                    doing = where.read_text()
                    killed += f", while {doing}"
                    if found := re.search(r"\((\d+) parameters\)", doing):
                        built = int(found.group(1))
                for p in procs:  # our own children, by pid
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)
                for p in procs:
                    p.wait()
                break
            time.sleep(0.02)
        ranks = []
        for rank in range(WORLD_SIZE):
            out = Path(tmp) / f"rank{rank}.json"
            if out.exists():
                ranks.append(RankResult(**json.loads(out.read_text())))
        result = TrialResult(trial, ok=False, budget_bytes=budget_bytes, ranks=ranks, watchdog_peak_bytes=seen,
                             killed_params=built, wall_s=time.monotonic() - start)
        if killed:
            result.reason = killed
        elif any(p.returncode for p in procs) or len(ranks) < WORLD_SIZE:
            tail = (Path(tmp) / "rank0.log").read_text(errors="replace").strip().splitlines()[-3:]
            result.reason = f"a rank failed (exit {[p.returncode for p in procs]}): {' | '.join(tail)}"
        elif any(r.steps_taken != trial.steps or r.skipped_steps for r in ranks):
            result.reason = f"optimizer steps taken {[r.steps_taken for r in ranks]} of {trial.steps}"
        elif budget_bytes is not None and result.peak_bytes > budget_bytes:
            result.reason = f"over budget: peak {result.peak_bytes / GIB:.2f} GiB > {budget_bytes / GIB:.2f} GiB"
        else:
            result.ok = True
    return result


# --- the group ---------------------------------------------------------------------------------------

SMALL_BUCKETS = (
    # DeepSpeed's ZeRO-3 defaults size its buffers for GPUs holding billions of parameters: it keeps up to
    # 1e9 gathered parameters live, prefetches 5e7 ahead and zero-fills a 1e9-element fp32 gradient buffer
    # per optimizer sub-group, which on a 300M model is more than the model. Buckets of a few million
    # elements keep what a rank gathers or reduces at once small beside its partition (and cost little
    # speed here: the step is bound by compute, not by the number of collectives).
    "train.deepspeed.extra.zero_optimization.stage3_prefetch_bucket_size=5000000",
    "train.deepspeed.extra.zero_optimization.stage3_max_live_parameters=10000000",
    "train.deepspeed.extra.zero_optimization.stage3_max_reuse_distance=10000000",
    "train.deepspeed.extra.zero_optimization.reduce_bucket_size=5000000",
    "train.deepspeed.extra.zero_optimization.sub_group_size=10000000",
)

RATIO_WIDTH = 192
"""Base width of the ratio model: SD 1.5's UNet at 192 channels has 314M parameters (>= 300M)."""
WIDTH_STEP = 16


def zero3(name: str, width: int | None, *, precision: str = "bf16", offload: str = "none",
          nvme_path: str | None = None, **kw) -> Trial:
    """ZeRO-3 as a large model runs it: parameters partitioned from construction (zero.Init), small
    buckets; `offload` nvme: optimizer state and parameters in files under nvme_path (ZeRO-Infinity)."""
    return Trial(name=name, width=width, stage=3, zero_init=True, precision=precision, offload_optimizer=offload,
                 offload_param=offload, nvme_path=nvme_path if offload == "nvme" else None, extra=SMALL_BUCKETS, **kw)


def params_at(width: int) -> float:
    """Parameters of SD 1.5's UNet at base width `width` (quadratic in the width: 314M at 192)."""
    return 314_140_228 * (width / RATIO_WIDTH) ** 2


def width_for(params: float) -> int:
    """The multiple of WIDTH_STEP whose UNet is closest below `params` parameters (at least one step)."""
    return max(WIDTH_STEP, int(math.sqrt(params / params_at(RATIO_WIDTH)) * RATIO_WIDTH) // WIDTH_STEP * WIDTH_STEP)


def largest_fitting(run, guess: int, max_trials: int, max_width: int = 320
                    ) -> tuple[TrialResult | None, TrialResult | None, list]:
    """The largest base width (a multiple of WIDTH_STEP, at most `max_width`) whose trial `run(width)`
    passes, searched from `guess`: upwards in growing steps while trials pass, downwards while they
    fail, then by halving the gap between the largest pass and the smallest fail; at most `max_trials`
    trials. Returns that pass, the smallest fail above it (None when none was seen: the figure is then a
    lower bound) and every trial in order."""
    fit: TrialResult | None = None
    fail: TrialResult | None = None
    tried: list[TrialResult] = []
    width, stride = max(WIDTH_STEP, min(guess, max_width) // WIDTH_STEP * WIDTH_STEP), WIDTH_STEP * 2
    for _ in range(max_trials):
        result = run(width)
        tried.append(result)
        if result.ok and (fit is None or width > fit.trial.width):
            fit = result
        if not result.ok and (fail is None or width < fail.trial.width):
            fail = result
        if fit is not None and fail is not None:
            lo, hi = fit.trial.width, fail.trial.width
            if hi - lo <= WIDTH_STEP:
                break
            width = (lo + hi) // 2 // WIDTH_STEP * WIDTH_STEP
            width = width if width > lo else lo + WIDTH_STEP
        elif fit is not None:
            if width >= max_width:
                break
            width, stride = min(max_width, width + stride), stride * 2
        else:
            if width <= WIDTH_STEP:
                break
            width, stride = max(WIDTH_STEP, width - stride), stride * 2
    return fit, fail, tried


def bench_zero(work: Path, *, budget_gib: float = 3.0, search_trials: int = 4, sd15: bool = True,
               sd15_resolution: int = 512) -> tuple[list, dict]:
    """Rows of the `zero` group (bench.run.Row) and its details for the JSON:
    - per-rank peak of the 314M UNet on 2 ranks, ZeRO-3 (zero.Init, small buckets) vs ZeRO-0, in bf16
      (the precision a large model trains in) and fp32 (target <= 0.6x);
    - the largest UNet that takes its optimizer steps within `budget_gib` per rank, ZeRO-3 with NVMe
      offload of parameters and optimizer state vs ZeRO-0, bf16 (target >= 1.8x);
    - the sd15 preset's UNet (860M) training on 2 ranks here: ZeRO-3, bf16, NVMe offload, at
      `sd15_resolution` px, its peak and seconds per step."""
    from bench.run import Row

    nvme = work / "zero-nvme"
    nvme.mkdir(parents=True, exist_ok=True)
    budget = int(budget_gib * GIB)
    rows: list[Row] = []
    details: dict = {"world_size": WORLD_SIZE, "budget_gib": budget_gib, "trials": []}

    def record(result: TrialResult) -> TrialResult:
        details["trials"].append(result.to_dict())
        status = "ok" if result.ok else f"did not fit: {result.reason}"
        print(f"  zero: {result.trial.name} w={result.trial.width} {result.params / 1e6:.0f}M params, "
              f"peak {result.peak_bytes / GIB:.2f} GiB/rank, {result.step_s:.1f} s/step: {status}", flush=True)
        return result

    ratios: dict[str, float | None] = {}
    measured: dict[str, TrialResult] = {}
    for precision in ("bf16", "fp32"):
        plain = record(run_trial(Trial(name=f"zero0-{precision}", width=RATIO_WIDTH, precision=precision),
                                 need_bytes=8 * GIB * WORLD_SIZE))
        measured[precision] = plain
        sharded = record(run_trial(zero3(f"zero3-{precision}", RATIO_WIDTH, precision=precision),
                                   need_bytes=6 * GIB * WORLD_SIZE))
        base = f"{plain.params / 1e6:.0f}M UNet, ZeRO-0, {precision}, peak per rank"
        rows.append(Row("zero", base, plain.peak_bytes / GIB, "GiB", ratio_to=base,
                        note="" if plain.ok else plain.reason))
        rows.append(Row("zero", f"{sharded.params / 1e6:.0f}M UNet, ZeRO-3 + zero.Init, {precision}, peak per rank",
                        sharded.peak_bytes / GIB, "GiB", ratio_to=base,
                        note="target <= 0.6x" if sharded.ok else sharded.reason))
        ratios[f"ZeRO-3 / ZeRO-0 peak per rank, {precision} (target <= 0.6)"] = (
            sharded.peak_bytes / plain.peak_bytes if plain.ok and sharded.ok else None)

    # Bytes per parameter measured above make the first guesses; the search corrects them.
    def guess(result: TrialResult) -> int:
        baseline = max(r.baseline_bytes for r in result.ranks) if result.ranks else 0
        per_param = (result.peak_bytes - baseline) / max(result.params, 1)
        return width_for((budget - baseline) / per_param) if per_param > 0 else RATIO_WIDTH

    plain_guess = guess(measured["bf16"])
    largest = {}
    for name, make in (("ZeRO-0", lambda w: Trial(name=f"max-zero0-w{w}", width=w, precision="bf16")),
                       ("ZeRO-3 + NVMe offload", lambda w: zero3(f"max-zero3-nvme-w{w}", w, offload="nvme",
                                                                  nvme_path=str(nvme)))):
        # ZeRO-3 with offload starts at the target (1.8x the parameters: sqrt(1.8) the width).
        start = plain_guess if name == "ZeRO-0" else width_for(params_at(plain_guess) * 1.8)
        fit, fail, _ = largest_fitting(lambda w, make=make: record(run_trial(make(w), budget_bytes=budget)),
                                       start, search_trials)
        largest[name] = (fit, fail)
        bound = "" if fail is None else f"; {fail.params / 1e6:.0f}M did not fit"
        rows.append(Row("zero-max", f"largest UNet within {budget_gib:g} GiB/rank, {name}, bf16",
                        fit.params / 1e6 if fit else math.nan, "M params", ratio_to=None,
                        note=(f"peak {fit.peak_bytes / GIB:.2f} GiB{bound}" if fit else "none fitted") +
                             ("" if fail is not None else "; a lower bound: the search never failed")))
    fit0, fit3 = largest["ZeRO-0"][0], largest["ZeRO-3 + NVMe offload"][0]
    ratios["largest UNet, ZeRO-3 + NVMe offload / ZeRO-0 (target >= 1.8)"] = (
        fit3.params / fit0.params if fit0 and fit3 else None)

    if sd15:
        result = record(run_trial(zero3("sd15", None, offload="nvme", nvme_path=str(nvme), steps=3,
                                        resolution=sd15_resolution, text_tokens=77),
                                  budget_bytes=10 * GIB, timeout_s=3600))
        note = (f"peak {result.peak_bytes / GIB:.2f} GiB/rank, {WORLD_SIZE} ranks, ZeRO-3 bf16 NVMe offload"
                if result.ok else result.reason)
        rows.append(Row("sd15", f"sd15 UNet ({result.params / 1e6:.0f}M), {sd15_resolution}px, batch 1/rank, s/step",
                        result.step_s, "s/step", note=note))
        details["sd15"] = {"ok": result.ok, "peak_gib": result.peak_bytes / GIB, "step_s": result.step_s,
                           "params": result.params, "resolution": sd15_resolution, "reason": result.reason}
    details["ratios"] = ratios
    return rows, details


# --- one rank ----------------------------------------------------------------------------------------

def _worker(spec_path: str, out_path: str) -> None:
    """One rank of a trial: build, step, write RankResult as JSON to out_path (last: a rank killed
    before the end writes nothing)."""
    t0 = time.perf_counter()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on two cores
    from training.config import load_config
    from training.models.assembly import build_unet
    from training.models.noise import build_noise_scheduler
    from training.runtime.context import WorkerContext
    from training.runtime.engine import build_engine, module_init
    from training.tasks.diffusion_loss import diffusion_loss

    spec = json.loads(Path(spec_path).read_text())
    trial = Trial(**spec | {"extra": tuple(spec["extra"])})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = RankResult(rank=rank)
    out.baseline_bytes = _status_kib("self", "VmHWM") * 1024
    out.phase_s["start"] = time.perf_counter() - t0
    progress = Path(out_path + ".progress")
    progress.write_text("building the UNet")

    cfg = load_config(ROOT / "configs/sd15.yaml", trial.overrides())
    latent = cfg.model.resolution // 8
    width = cfg.model.unet.cross_attention_dim
    unet = build_unet(cfg.model.unet, sample_size=latent, in_channels=4, cross_attention_dim=width, seed=0,
                      init=module_init(cfg.train))
    out.params = sum(getattr(p, "ds_numel", p.numel()) for p in unet.parameters())
    out.phase_s["unet"] = time.perf_counter() - t0 - out.phase_s["start"]
    progress.write_text(f"building the engine ({out.params} parameters)")
    engine = build_engine(unet, cfg.train, WorkerContext(rank, world, torch.device("cpu")))
    scheduler = build_noise_scheduler(cfg.model.scheduler)
    out.built_bytes = _status_kib("self", "VmHWM") * 1024
    out.phase_s["engine"] = time.perf_counter() - t0 - out.phase_s["start"] - out.phase_s["unet"]

    generator = torch.Generator().manual_seed(rank)
    for step in range(trial.steps):
        progress.write_text(f"step {step + 1} ({out.params} parameters)")
        latents = torch.randn(trial.batch_size, 4, latent, latent, generator=generator)
        states = torch.randn(trial.batch_size, trial.text_tokens, width, generator=generator)
        start = time.perf_counter()
        loss = diffusion_loss(engine, scheduler, latents, states, generator)
        engine.backward(loss)
        engine.step()
        out.step_s.append(time.perf_counter() - start)
        out.losses.append(float(loss.detach()))
    out.steps_taken = int(engine.global_steps)
    out.skipped_steps = int(getattr(engine, "skipped_steps", 0))
    dist.barrier()
    out.peak_bytes = _status_kib("self", "VmHWM") * 1024
    Path(out_path).write_text(json.dumps(asdict(out)))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m bench.zero_memory --worker TRIAL_JSON OUT_JSON (bench.run --zero-only runs it)")
