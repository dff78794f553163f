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

Run alone (about 10-15 minutes on 2 cores; it needs up to ~15 GiB free at once):
  flock /tmp/ldmflow-heavy.lock .venv/bin/python -m bench.run --zero-only
"""

from __future__ import annotations

import json
import math
import os
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
    wall_s: float = 0.0

    @property
    def params(self) -> int:
        return max((r.params for r in self.ranks), default=0)

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
    with tempfile.TemporaryDirectory(prefix="ldmflow-zeromem-") as tmp:
        spec = Path(tmp) / "trial.json"
        spec.write_text(json.dumps(asdict(trial)))
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
        seen = 0
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
                    killed += f", while {where.read_text()}"
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
                             wall_s=time.monotonic() - start)
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
