"""The GPU plan (issue 15, item 7): sd15 UNet training throughput and MFU on one GPU, and the GPU-only risks.

    python3 -m bench.gpu --out FILE [--device cuda|cpu] [--preset sd15|tiny] [--quick] [--budget-s S]

Sections, each in its own try/except (a failure is a finding: its error text is recorded and the rest
runs), the JSON rewritten after each so that a run stopped at its time limit still leaves what it had:

  machine      GPU, torch / CUDA / cuDNN / triton versions, and the measured bf16 matmul rate (8192^3)
               that serves as a ceiling next to the datasheet's dense bf16 peak
  train        the preset's UNet (built by training.models.assembly.build_unet, random init) on random
               latents and text states (precomputed latents: no VAE or text encoder in the step):
               forward + backward + fused AdamW, bf16 autocast over fp32 weights, SDPA, channels_last,
               TF32; images/s, s/step, peak memory per (resolution, batch)
  flops        FLOPs per image forward+backward (torch.utils.flop_counter on one step) and MFU against
               the datasheet peak and against the measured matmul rate
  deepspeed    the project's engine (training.runtime.engine.build_engine) on one rank, ZeRO-2 bf16, the
               tiny UNet: steps, save, convert to universal (training.checkpoint.elastic), load it, step
               with fused AdamW, once without and once with the fix of Adam's step device
  determinism  two runs of 3 steps from the same state: bit-identical losses with deterministic
               algorithms (CUBLAS_WORKSPACE_CONFIG=:4096:8), and without (a child process: the flag and
               the cuBLAS setting are process-wide)
  compile      torch.compile of the UNet at the largest resolution (a child process, killed when the
               budget or 150 s of compile runs out)

On the CPU (`--device cpu --preset tiny --quick`) every section runs on small shapes in seconds: that is
what tests/bench/test_gpu_bench.py runs; the figures mean nothing there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEAK_BF16_DENSE = 989e12
"""FLOP/s: dense BF16 tensor-core peak of an H100/H200 SXM (NVIDIA datasheet; the 1979 figure is with sparsity)."""

MLPERF_SD_IMAGES_PER_S = {"H200": 144.0, "H100": 136.0, "B200": 275.0}
"""Per-GPU images/s at 512 px of MLPerf Training v5.0's Stable Diffusion v2 results (8xH200: 26.7 min)."""

MINILM_WIDTH = 384
"""Width of the builtin MiniLM-L6 text states, the cross-attention width of presets that follow the encoder."""

COMPILE_LIMIT_S = 150.0
"""torch.compile is given up (its child killed) when compiling takes longer than this."""


@dataclass(frozen=True)
class Options:
    device: str
    preset: str
    quick: bool
    budget_s: float
    compile_batch: int | None = None
    """The compiled case's batch; None: the smallest batch of the largest resolution."""

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


@dataclass(frozen=True)
class Case:
    resolution: int
    batches: tuple[int, ...]


def cases(opts: Options, resolution: int) -> list[Case]:
    """(resolution, batch sizes) to train: sd15 at 256 and 512 px with a batch that fills the GPU and a
    larger one if memory allows; the preset's own resolution (and twice it) on the CPU."""
    if opts.preset == "sd15":
        if opts.quick:
            return [Case(256, (4,)), Case(512, (2,))]
        return [Case(256, (64, 128)), Case(512, (32, 64))]
    return [Case(resolution, (2,)), Case(resolution * 2, (2,))]


# --- building -------------------------------------------------------------------------------


@dataclass
class Spec:
    """What the benchmark trains: the preset's UNet config and the shapes of its inputs."""

    cfg: object
    downsample: int
    latent_channels: int
    context: int
    width: int

    @classmethod
    def load(cls, preset: str) -> Spec:
        from training.config import load_config

        cfg = load_config(ROOT / f"configs/{preset}.yaml")
        m = cfg.model
        return cls(cfg=cfg, downsample=2 ** (len(m.vae.block_out_channels) - 1), latent_channels=m.vae.latent_channels,
                   context=m.text_encoder.max_length, width=m.unet.cross_attention_dim or MINILM_WIDTH)

    def unet(self, device, seed: int = 0, resolution: int | None = None):
        """The UNet, seeded, built directly on `device` (sd15's 860M parameters initialise in a second on a GPU)."""
        import torch

        from training.models.assembly import build_unet

        m = self.cfg.model
        size = (resolution or m.resolution) // self.downsample
        with torch.device(device):
            unet = build_unet(m.unet, sample_size=size, in_channels=self.latent_channels,
                              cross_attention_dim=self.width, seed=seed)
        return unet

    def batch(self, batch: int, resolution: int, device, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        side = resolution // self.downsample
        latents = torch.randn(batch, self.latent_channels, side, side, generator=g)
        states = torch.randn(batch, self.context, self.width, generator=g)
        return (latents.to(device).contiguous(memory_format=torch.channels_last), states.to(device))


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def train_step(unet, opt, sched, latents, states, generator, autocast: bool):
    """One step of the project's objective (training.tasks.diffusion_loss) under bf16 autocast; the loss
    stays on the device (no host sync inside a timed window)."""
    import torch

    from training.tasks.diffusion_loss import diffusion_loss

    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = diffusion_loss(unet, sched, latents, states, generator)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn: Callable[[], None], reps: int) -> float:
    """Seconds per call of `fn`, over `reps` calls (CUDA events on a GPU)."""
    import torch

    sync(device)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    began = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - began) / reps


def set_fast_math(opts: Options) -> None:
    import torch

    # TF32 for the fp32 matmuls and convolutions left outside autocast (the optimizer's are elementwise).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = opts.cuda  # fixed shapes per case: autotune once, in the warm-up


def free(device) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --- sections -------------------------------------------------------------------------------


def section_machine(opts: Options) -> dict:
    import torch

    out: dict = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                 "cuda": torch.version.cuda, "device": opts.device}
    with contextlib.suppress(ImportError):
        import triton

        out["triton"] = triton.__version__
    for name in ("diffusers", "deepspeed", "transformers"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    if opts.cuda:
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": props.name, "sms": props.multi_processor_count, "gpu_memory_gib": props.total_memory / 2**30,
                "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version()}
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=15)
            out["nvidia_smi"] = smi.stdout.strip()
    n = 512 if opts.quick or not opts.cuda else 8192
    a = torch.randn(n, n, device=opts.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=opts.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps = 3 if opts.quick else 20
    s = timed(opts.device, lambda: a @ b, reps)
    out["matmul"] = {"n": n, "dtype": "bfloat16", "reps": reps, "s": s, "tflops": 2 * n**3 / s / 1e12}
    return out


def section_train(opts: Options, spec: Spec, results: dict) -> dict:
    """Training throughput per (resolution, batch), then FLOPs per image at each resolution."""
    import torch

    set_fast_math(opts)
    device = opts.device
    sched = scheduler()
    started = time.perf_counter()
    unet = spec.unet(device).to(memory_format=torch.channels_last)
    unet.train()
    build_s = time.perf_counter() - started
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2, fused=True)
    params = sum(p.numel() for p in unet.parameters())
    out: dict = {"params": params, "build_s": build_s, "attention_processors": processors,
                 "precision": "bf16 autocast, fp32 weights and AdamW state", "optimizer": "AdamW(fused=True)",
                 "channels_last": True, "tf32": True, "runs": [], "flops": []}
    results["train"] = out
    # --quick (the CPU test): one timed step shows the section works; the figure means nothing there
    warmup, steps = (1, 1) if opts.quick else (3, 10)
    generator = torch.Generator().manual_seed(0)
    for case in cases(opts, spec.cfg.model.resolution):
        for batch in case.batches:
            run = {"resolution": case.resolution, "latent": case.resolution // spec.downsample, "batch": batch}
            out["runs"].append(run)
            try:
                latents, states = spec.batch(batch, case.resolution, device)
                if opts.cuda:
                    torch.cuda.reset_peak_memory_stats()

                def step(latents=latents, states=states):
                    train_step(unet, opt, sched, latents, states, generator, autocast=True)

                for _ in range(warmup):
                    step()
                s = timed(device, step, steps)
                run |= {"steps": steps, "s_per_step": s, "images_per_s": batch / s}
                if opts.cuda:
                    run["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as e:  # noqa: BLE001 - an OOM at the larger batch is a finding, not the end of the section
                run["error"] = error_text(e)
                opt.zero_grad(set_to_none=True)
            finally:
                latents = states = None
                free(device)
            write(results)
    for case in cases(opts, spec.cfg.model.resolution):
        entry = {"resolution": case.resolution}
        out["flops"].append(entry)
        try:
            entry |= count_flops(unet, sched, spec, case.resolution, device)
        except Exception as e:  # noqa: BLE001 - recorded: a failure is a finding
            entry["error"] = error_text(e)
        free(device)
    mfu(results)
    return out


def count_flops(unet, sched, spec: Spec, resolution: int, device) -> dict:
    """FLOPs of one forward + backward per image, as torch.utils.flop_counter counts them (matmuls,
    convolutions, attention; elementwise ops and the optimizer are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from training.tasks.diffusion_loss import diffusion_loss

    batch = 2
    latents, states = spec.batch(batch, resolution, device)
    counter = FlopCounterMode(display=False)
    # (autocast changes no FLOP count; it is off on the meta device, where tests count sd15 without computing)
    autocast = torch.autocast("cpu" if latents.device.type == "meta" else latents.device.type, dtype=torch.bfloat16,
                              enabled=latents.device.type != "meta")
    with counter:  # one window: entering FlopCounterMode again would reset its counts
        with autocast:
            loss = diffusion_loss(unet, sched, latents, states, torch.Generator().manual_seed(0))
        loss.backward()
    unet.zero_grad(set_to_none=True)
    total = counter.get_total_flops()
    by_op = {str(op): n / batch for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops_per_image": total / batch, "tflop_per_image": total / batch / 1e12, "by_op": by_op,
            "counted_batch": batch}


def mfu(results: dict) -> None:
    """Add achieved TFLOP/s and MFU (vs the datasheet peak and vs the measured matmul rate) to each run."""
    train = results.get("train") or {}
    per_image = {f["resolution"]: f["flops_per_image"] for f in train.get("flops", []) if "flops_per_image" in f}
    ceiling = ((results.get("machine") or {}).get("matmul") or {}).get("tflops")
    for run in train.get("runs", []):
        if "images_per_s" in run and run["resolution"] in per_image:
            achieved = per_image[run["resolution"]] * run["images_per_s"]
            run["achieved_tflops"] = achieved / 1e12
            run["mfu_vs_peak"] = achieved / PEAK_BF16_DENSE
            if ceiling:
                run["mfu_vs_matmul"] = achieved / (ceiling * 1e12)


def section_deepspeed(opts: Options, work: Path) -> dict:
    """ZeRO-2 bf16 through the project's engine on one rank; a universal checkpoint round trip; fused AdamW after."""
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import deepspeed

    from training.checkpoint.elastic import (
        UNIVERSAL_CLIENT_STATE,
        convert_to_universal,
        load_universal_checkpoint,
        place_optimizer_steps,
    )
    from training.config import load_config
    from training.runtime.context import WorkerContext
    from training.runtime.engine import build_engine, deepspeed_config
    from training.tasks.diffusion_loss import diffusion_loss

    out: dict = {"accelerator": deepspeed.get_accelerator().device_name(), "deepspeed": deepspeed.__version__}
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if opts.cuda else "gloo", auto_mpi_discovery=False)
    spec = Spec.load("tiny")
    where = "train.use_gpu=true" if opts.cuda else "train.allow_cpu_half_precision=true"  # bf16 on the CPU: on purpose
    # --quick (the CPU test, where this section took 53 of its 100 s with batch 4): batch 2
    batch = 2 if opts.quick else 4
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.zero_stage=2", "train.precision=bf16",
                                                   f"train.batch_size={batch}",
                                                   "train.grad_accum=1", "train.warmup_steps=0",
                                                   "train.ema.enabled=false", where])
    device = torch.device("cuda", 0) if opts.cuda else torch.device("cpu")
    ctx = WorkerContext(rank=0, world_size=1, device=device)
    out["config"] = deepspeed_config(cfg.train)
    sched = scheduler()
    latents, states = spec.batch(batch, spec.cfg.model.resolution, device)
    generator = torch.Generator().manual_seed(0)

    def steps(engine, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            loss = diffusion_loss(engine, sched, latents, states, generator)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return losses

    def inner(engine):
        return getattr(engine.optimizer, "optimizer", engine.optimizer)

    def step_devices(engine) -> dict:
        opt = inner(engine)
        seen: dict[str, int] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                key = f"step {step.device} {str(step.dtype).removeprefix('torch.')}" if torch.is_tensor(step) else \
                    f"step {type(step).__name__}"
                key += f" / param {p.device}"
                seen[key] = seen.get(key, 0) + 1
        return seen

    engine = build_engine(spec.unet("cpu"), cfg.train, ctx)
    out["optimizer"] = f"{type(engine.optimizer).__name__} over {type(inner(engine)).__name__}" \
                       f"(fused={inner(engine).param_groups[0].get('fused')})"
    out["losses_before_save"] = steps(engine, 3)
    out["steps_before_save"] = step_devices(engine)
    save_dir, scratch = work / "deepspeed", work / "universal"
    engine.save_checkpoint(str(save_dir), tag="step3", client_state=UNIVERSAL_CLIENT_STATE)
    saved = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    began = time.perf_counter()
    universal = convert_to_universal(save_dir, "step3", scratch)
    out["convert_s"] = time.perf_counter() - began
    del engine
    free(device)

    engine = None
    for label, place in (("without_fix", False), ("with_fix", True)):
        attempt: dict = {}
        out[label] = attempt
        try:
            # Another seed: the weights must come from the checkpoint, not from the same initialisation.
            engine = build_engine(spec.unet("cpu", seed=1), cfg.train, ctx, load_universal=True)
            load_universal_checkpoint(engine, scratch, universal, place_steps=place)
            attempt["steps_after_load"] = step_devices(engine)
            attempt["weights_max_abs_diff"] = max(
                float((v.detach().float().cpu() - saved[k]).abs().max()) for k, v in engine.module.state_dict().items())
            attempt["global_steps"] = engine.global_steps
            attempt["losses_after_load"] = steps(engine, 2)
            attempt["ok"] = True
        except Exception as e:  # noqa: BLE001 - recorded: the failure is what this section looks for
            attempt |= {"ok": False, "error": error_text(e)}
            if not place and engine is not None:
                # Would the fix alone make this engine step? (the state DeepSpeed loaded, steps moved)
                try:
                    attempt["fix_moved_steps"] = place_optimizer_steps(inner(engine))
                    attempt["losses_after_fix_on_same_engine"] = steps(engine, 1)
                except Exception as e2:  # noqa: BLE001 - recorded
                    attempt["error_after_fix_on_same_engine"] = error_text(e2)
        finally:
            engine = None
            free(device)
    out["needs_fix"] = bool(not out["without_fix"].get("ok") and out["with_fix"].get("ok"))
    return out


def section_determinism(opts: Options, spec: Spec) -> dict:
    """Runs in a child with CUBLAS_WORKSPACE_CONFIG set from the start: are 3 steps from the same
    state bit-identical, with deterministic algorithms and without?"""
    import torch

    set_fast_math(opts)
    device = opts.device
    sched = scheduler()
    resolution = cases(opts, spec.cfg.model.resolution)[0].resolution
    batch = 1 if opts.quick else 8  # --quick: four runs of 3 steps; one image each shows (non)determinism as well
    latents, states = spec.batch(batch, resolution, device)
    out: dict = {"resolution": resolution, "batch": batch, "steps": 3,
                 "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}

    def run_once() -> dict:
        unet = spec.unet(device, seed=0).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
        generator = torch.Generator().manual_seed(0)
        losses = [train_step(unet, opt, sched, latents, states, generator, autocast=True) for _ in range(3)]
        checksum = sum(float(p.detach().double().sum()) for p in unet.parameters())
        return {"losses": [float(x) for x in losses], "losses_hex": [float(x).hex() for x in losses],
                "param_checksum": checksum}

    for label, deterministic in (("deterministic", True), ("default", False)):
        entry: dict = {}
        out[label] = entry
        try:
            torch.use_deterministic_algorithms(deterministic)
            torch.backends.cudnn.deterministic = deterministic
            torch.backends.cudnn.benchmark = not deterministic and opts.cuda
            a, b = run_once(), run_once()
            entry |= {"run_a": a, "run_b": b, "losses_identical": a["losses_hex"] == b["losses_hex"],
                      "params_identical": a["param_checksum"] == b["param_checksum"]}
        except Exception as e:  # noqa: BLE001 - recorded (deterministic mode refuses some kernels)
            entry["error"] = error_text(e)
        finally:
            torch.use_deterministic_algorithms(False)
            free(device)
    return out


def section_compile(opts: Options, spec: Spec, results: dict) -> dict:
    """torch.compile of the UNet at the largest resolution (runs in a child the parent kills at its limit)."""
    import torch

    set_fast_math(opts)
    device = opts.device
    case = cases(opts, spec.cfg.model.resolution)[-1]
    batch = opts.compile_batch or case.batches[0]
    sched = scheduler()
    unet = spec.unet(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    compiled = torch.compile(unet)
    latents, states = spec.batch(batch, case.resolution, device)
    generator = torch.Generator().manual_seed(0)
    out: dict = {"resolution": case.resolution, "batch": batch, "mode": "default"}
    results["compile"] = out

    def step():
        train_step(compiled, opt, sched, latents, states, generator, autocast=True)

    began = time.perf_counter()
    step()
    sync(device)
    out["compile_s"] = time.perf_counter() - began  # the first step: tracing + inductor for forward and backward
    write(results)
    warmup, steps = (1, 2) if opts.quick else (3, 10)
    for _ in range(warmup):
        step()
    s = timed(device, step, steps)
    out |= {"steps": steps, "s_per_step": s, "images_per_s": batch / s}
    return out


# --- running --------------------------------------------------------------------------------

_OUT: Path | None = None
_DEVICE = "cpu"


def write(results: dict) -> None:
    """Rewrite the JSON (after every section and case: a run killed at its limit keeps what it had)."""
    if _OUT is not None:
        tmp = _OUT.with_suffix(_OUT.suffix + ".tmp")
        tmp.write_text(json.dumps(json_safe(results), indent=2))
        tmp.replace(_OUT)


def json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def error_text(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0][:600] if first else ''}{where}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_section(results: dict, name: str, fn: Callable[[], dict | None]) -> None:
    began = time.perf_counter()
    try:
        value = fn()
        if value is not None:
            results[name] = value
    except Exception as e:  # noqa: BLE001 - each section on its own: a failure is recorded, the rest runs
        failure = {"error": error_text(e), "traceback": traceback.format_exc()[-3000:]}
        results[name] = (results.get(name) or {}) | failure
        print(f"[bench.gpu] {name} failed: {results[name]['error']}", flush=True)
    results.setdefault(name, {})["seconds"] = time.perf_counter() - began
    free(_DEVICE)  # the section's model and optimizer are gone with its frame: return their memory
    write(results)
    print(f"[bench.gpu] {name} done in {results[name]['seconds']:.1f} s", flush=True)


def run_child(opts: Options, name: str, timeout_s: float, env: dict[str, str] | None = None) -> dict:
    """Run one section in a child process (its own process-wide settings), killed with its process group
    after `timeout_s`; returns what it wrote, with `timed_out` when it was killed."""
    with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{name}-") as tmp:
        out = Path(tmp) / "section.json"
        cmd = [sys.executable, "-m", "bench.gpu", "--section", name, "--out", str(out), "--device", opts.device,
               "--preset", opts.preset] + (["--quick"] if opts.quick else []) \
            + ([f"--compile-batch={opts.compile_batch}"] if opts.compile_batch else [])
        proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | (env or {}), start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            status = {"exit_code": proc.returncode}
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # inductor's compile workers go with it
            proc.wait()
            status = {"timed_out": True, "limit_s": timeout_s}
        written = json.loads(out.read_text()) if out.exists() else {}
    section = written.get(name) or {}
    if not written and status.get("exit_code"):
        section["error"] = f"child exited with {status['exit_code']} and wrote nothing (see the log above)"
    return section | status


def main(argv: list[str] | None = None) -> int:
    global _OUT, _DEVICE
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--preset", choices=("sd15", "tiny"), default=None, help="default: sd15 on cuda, tiny on cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few steps (the CPU test)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="seconds the whole run may take; the compile child gets what is left")
    p.add_argument("--skip", action="append", default=[],
                   choices=("machine", "train", "deepspeed", "determinism", "compile"), help="leave a section out")
    p.add_argument("--compile-batch", type=int, default=None,
                   help="the compiled case's batch (default: the smallest batch at the largest resolution)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in a child
    args = p.parse_args(argv)
    preset = args.preset or ("sd15" if args.device == "cuda" else "tiny")
    opts = Options(device=args.device, preset=preset, quick=args.quick, budget_s=args.budget_s,
                   compile_batch=args.compile_batch)
    # Before deepspeed is imported anywhere: it picks its accelerator once. Set, not defaulted: the
    # Makefile exports DS_ACCELERATOR=cpu for the CPU-only machines `make bench` usually runs on.
    os.environ["DS_ACCELERATOR"] = "cuda" if opts.cuda else "cpu"
    _OUT, _DEVICE = Path(args.out), opts.device
    _OUT.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    import torch

    if opts.cuda and not torch.cuda.is_available():
        print("bench.gpu: --device cuda but torch sees no GPU: run with --device cpu", file=sys.stderr)
        return 2
    spec = Spec.load(preset)

    if args.section:  # a child: one section, its result under its name
        results: dict = {}
        sections = {"determinism": lambda: section_determinism(opts, spec),
                    "compile": lambda: section_compile(opts, spec, results)}
        run_section(results, args.section, sections[args.section])
        return 0

    results = {"args": vars(args) | {"preset": preset}, "reference": {
        "peak_bf16_dense_flops": PEAK_BF16_DENSE, "mlperf_sd_v5_images_per_s_per_gpu_512px": MLPERF_SD_IMAGES_PER_S}}
    def left() -> float:
        return opts.budget_s - (time.perf_counter() - began)

    if "machine" not in args.skip:
        run_section(results, "machine", lambda: section_machine(opts))
    if "train" not in args.skip:
        run_section(results, "train", lambda: section_train(opts, spec, results))
    if "deepspeed" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-ds-") as tmp:
            run_section(results, "deepspeed", lambda: section_deepspeed(opts, Path(tmp)))
    if "determinism" not in args.skip:
        run_section(results, "determinism", lambda: run_child(
            # 150 s at most on the GPU (device time is short); on the CPU whatever the budget leaves
            opts, "determinism", max(30.0, min(150.0, left() - 60) if opts.cuda else left() - 60),
            {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}))
    if "compile" not in args.skip:
        if left() < 60:
            results["compile"] = {"skipped": f"{left():.0f} s of the {opts.budget_s:.0f} s budget left"}
        elif not opts.cuda and opts.quick:
            # inductor on the CPU compiles C++ for minutes: nothing to learn about the GPU from it
            results["compile"] = {"skipped": "not on the CPU with --quick"}
        else:
            run_section(results, "compile", lambda: run_child(opts, "compile", min(left() - 10, COMPILE_LIMIT_S + 60)))
    results["wall_s"] = time.perf_counter() - began
    write(results)
    print_table(results)
    print(f"\nwrote {_OUT}")
    return 0


def print_table(results: dict) -> None:
    machine = results.get("machine") or {}
    mm = machine.get("matmul") or {}
    print(f"\nbench.gpu: {machine.get('gpu', machine.get('device', '?'))}, torch {machine.get('torch')}, "
          f"CUDA {machine.get('cuda')}; bf16 matmul {mm.get('n')}^3: {mm.get('tflops', math.nan):.0f} TFLOP/s "
          f"(datasheet dense peak {PEAK_BF16_DENSE / 1e12:.0f})")
    train = results.get("train") or {}
    if train.get("error"):
        print(f"  train: {train['error']}")
    flops = {f["resolution"]: f for f in train.get("flops", [])}
    print(f"{'res':>5} {'batch':>5} {'img/s':>9} {'s/step':>8} {'peak GiB':>9} {'TFLOP/img':>10} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'vs mm':>6}")
    for run in train.get("runs", []):
        f = flops.get(run["resolution"], {})
        if "error" in run:
            print(f"{run['resolution']:>5} {run['batch']:>5}  {run['error'][:100]}")
            continue
        print(f"{run['resolution']:>5} {run['batch']:>5} {run['images_per_s']:>9.1f} {run['s_per_step']:>8.3f} "
              f"{run.get('peak_memory_gib', math.nan):>9.1f} {f.get('tflop_per_image', math.nan):>10.3f} "
              f"{run.get('achieved_tflops', math.nan):>8.1f} {run.get('mfu_vs_peak', math.nan):>6.1%} "
              f"{run.get('mfu_vs_matmul', math.nan):>6.1%}")
    best = max((r["images_per_s"] for r in train.get("runs", []) if r.get("resolution") == 512 and "images_per_s" in r),
               default=None)
    if best is not None:
        print(f"  512 px best {best:.1f} images/s vs MLPerf v5.0 per GPU: " +
              ", ".join(f"{gpu} {v:.0f} ({best / v:.2f}x)" for gpu, v in MLPERF_SD_IMAGES_PER_S.items()))
    for name in ("deepspeed", "determinism", "compile"):
        print(f"  {name}: {summary(name, results.get(name) or {})}")


def summary(name: str, s: dict) -> str:
    if not s:
        return "not run"
    if "skipped" in s:
        return f"skipped ({s['skipped']})"
    if s.get("timed_out"):
        compiled = f" (compile took {s['compile_s']:.0f} s)" if "compile_s" in s else ""
        return f"killed after {s['limit_s']:.0f} s{compiled}"
    if "error" in s and name != "deepspeed":
        return s["error"]
    if name == "deepspeed":
        if "error" in s:
            return s["error"]
        parts = []
        for label in ("without_fix", "with_fix"):
            a = s.get(label) or {}
            parts.append(f"{label}: " + ("steps OK" if a.get("ok") else f"FAILED {a.get('error', '?')[:160]}"))
        return f"ZeRO-2 bf16 universal round trip; {'; '.join(parts)}"
    if name == "determinism":
        return "; ".join(f"{k}: " + (str(v.get("losses_identical")) if "error" not in v else v["error"][:120])
                         for k in ("deterministic", "default") if isinstance(v := s.get(k), dict))
    if name == "compile" and "images_per_s" in s:
        return (f"{s['images_per_s']:.1f} images/s at {s['resolution']} px batch {s['batch']}, "
                f"compile {s['compile_s']:.0f} s")
    return json.dumps({k: v for k, v in s.items() if k != "traceback"})[:200]


if __name__ == "__main__":
    raise SystemExit(main())
