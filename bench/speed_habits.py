"""The `speed` group: each train.speed switch on vs the defaults, side by side in one run.

The tiny preset's UNet (6.3M parameters) takes full train steps (forward, backward, AdamW) in one
process on this machine's device, batch 8 of 16x16x4 latents, once per case:

  defaults          what train.speed's defaults run: sdpa attention, contiguous layout, no TF32, eager,
                    foreach AdamW (fused only on CUDA)
  attention=math    diffusers' AttnProcessor instead of torch's scaled_dot_product_attention
  channels_last     weights and inputs in torch.channels_last
  tf32              TF32 matmuls/convolutions (inert off CUDA Ampere+: the row then says so)
  fused_adamw=true  torch's fused AdamW kernel (CUDA, and CPU since torch 2.4)
  compile           torch.compile of the UNet (inductor; its compilation is a warm-up outside the timing)
  all on            channels_last + tf32 + fused AdamW + compile (sdpa)

Every case is warmed up first (compilation included), then timed in interleaved rounds so that load
from other processes falls on all of them alike; the best round counts. Ratios are to `defaults`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

BATCH = 8


@dataclass
class Case:
    name: str
    attention: str = "sdpa"
    channels_last: bool = False
    tf32: bool = False
    fused: bool | None = None
    """None: the default (fused on CUDA only, as train.speed.fused_adamw=auto)."""
    compile: bool = False
    times: list[float] = field(default_factory=list)
    note: str = ""


def cases(compile_backend: str | None) -> list[Case]:
    out = [Case("defaults"), Case("attention=math", attention="math"), Case("channels_last", channels_last=True),
           Case("tf32", tf32=True), Case("fused_adamw=true", fused=True)]
    if compile_backend:
        out.append(Case(f"compile ({compile_backend})", compile=True))
    out.append(Case("all on", channels_last=True, tf32=True, fused=True, compile=bool(compile_backend)))
    return out


def measure(steps: int, rounds: int = 3, compile_backend: str | None = "inductor", device: str = "cpu",
            threads: int | None = None) -> list[Case]:
    """Every case warmed up, then `rounds` interleaved timings of `steps` steps each; torch runs on
    `threads` CPU threads (None: all cores) and gets its own count back at the end."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or max(1, os.cpu_count() or 2))
        return _measure(steps, rounds, compile_backend, device)
    finally:
        torch.set_num_threads(before)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True  # torch's defaults


def _measure(steps: int, rounds: int, compile_backend: str | None, device: str) -> list[Case]:
    import torch

    from training.config import load_config
    from training.config.speed import SpeedConfig
    from training.models.assembly import build_components, build_unet
    from training.runtime.speed import apply_to_module
    from training.tasks.diffusion_loss import ObjectiveOptions, diffusion_loss

    dev = torch.device(device)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny.yaml")
    parts = build_components(cfg.model, seed=0)
    g = torch.Generator().manual_seed(0)
    size = cfg.model.latent_size
    latents = torch.randn(BATCH, 4, size, size, generator=g).to(dev)
    states = torch.randn(BATCH, cfg.model.text_encoder.max_length, parts.text.hidden_size, generator=g).to(dev)
    tf32_capable = dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 8
    runs = []
    for case in cases(compile_backend):
        unet = build_unet(cfg.model.unet, sample_size=size, in_channels=4, cross_attention_dim=parts.text.hidden_size,
                          seed=0).to(dev)
        apply_to_module(unet, SpeedConfig(attention=case.attention))
        if case.channels_last:
            unet.to(memory_format=torch.channels_last)
        fused = case.fused if case.fused is not None else dev.type == "cuda"
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2, fused=fused)
        if case.compile:
            unet.compile(backend=compile_backend)
        options = ObjectiveOptions(channels_last=case.channels_last)
        if case.tf32 and not tf32_capable:
            case.note = f"inert on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev.type}"

        def run(unet=unet, opt=opt, options=options, tf32=case.tf32):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32 and tf32_capable
            for _ in range(steps):
                loss = diffusion_loss(unet, parts.noise_scheduler, latents, states, torch.Generator().manual_seed(1),
                                      options=options)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        began = time.perf_counter()
        run()  # warm-up: the first steps (and a compilation) are outside every timed window
        if case.compile:
            case.note = f"compile + {steps} warm-up steps {time.perf_counter() - began:.0f} s"
        runs.append((case, run))
    for _ in range(rounds):
        for case, run in runs:
            began = time.perf_counter()
            run()
            case.times.append(time.perf_counter() - began)
    return [case for case, _ in runs]


def bench_speed(steps: int, compile_backend: str | None = "inductor", rounds: int = 3,
                threads: int | None = None) -> list:
    """Rows of the `speed` group for bench.run (samples/s, ratio to `defaults`)."""
    from bench.run import Row

    rows = []
    for case in measure(steps, rounds=rounds, compile_backend=compile_backend, threads=threads):
        rows.append(Row("speed", f"tiny UNet step, {case.name}", BATCH * steps / min(case.times), "samples/s",
                        ratio_to="tiny UNet step, defaults", note=case.note))
    return rows
