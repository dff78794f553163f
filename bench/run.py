"""Benchmarks: ``make bench`` (or ``python -m bench.run``) prints a table and writes JSON.

Machines here are shared and noisy, so each group is measured side by side in one run and reported
as a ratio to the group's baseline; absolute numbers are for orientation only.

Groups:
  shard    - shard writing throughput per image format (baseline: jpg)
  loader   - per-rank batch stream: decoded batches vs reading the tars alone (baseline: raw read)
  step     - tiny-preset UNet train step, single process, per batch size (baseline: batch 8)
  speed    - the same step with each train.speed switch on vs the defaults (bench/speed_habits.py)
  dataprep - images/s of `ldmflow shard` vs img2dataset 1.47.0 (its own venv, .venv-img2dataset/, built on
             first use) on the same 512x512 JPEGs -> 256x256 centre-crop JPEG-95 tars, 1 and 2 processes each;
             each row's ratio is to the row named after it, and the scaling ratios print below the table
  deepspeed (--deepspeed) - the real Ray Train + DeepSpeed loop, 2 workers, ZeRO stage 0 vs 2 vs 3
  checkpoint - the stall of a checkpoint step with train.checkpoint_upload=sync and =async (Ray Train to a
             local SeaweedFS S3), in milliseconds; ratio: x a normal step of the same runs (see
             bench/checkpoint_stall.py)
  overhead - our trainer (Ray + DeepSpeed, 1 worker) vs a bare PyTorch loop on the tiny UNet, samples/s (target
             >= 0.90); and configs/shapes-vae.yaml's held-out PSNR both ways, the mean over --overhead-vae-seeds
             seeds (target: within 0.2 dB; the full recipe is 4000 steps each way, about 7 + 12 minutes per seed
             on 2 cores; see bench/overhead.py)
  latents  - training samples/s from latent shards (`ldmflow encode`) vs raw shards, same model, for the demo's
             LDM, the tiny preset, and the tiny preset's UNet under SD's VAE shape (target >= 2x where the
             encoder dominates the step); and the loader's samples/s on both vs what that step consumes (rows
             in `loader`; see bench/latents.py)
  zero     - per-rank peak memory of a 314M-parameter UNet on 2 ranks, ZeRO-3 vs ZeRO-0 (target <= 0.6x); the
             largest UNet taking optimizer steps within a per-rank budget, ZeRO-3 + NVMe offload vs ZeRO-0
             (target >= 1.8x); the sd15 preset's UNet training on 2 ranks here, its peak and s/step
             (bench/zero_memory.py; about 15 minutes and up to ~16 GiB free)
  urls     - `ldmflow shard` on 100k URL rows from a local HTTP server, 2 processes, capped at 15 minutes:
             rows/s, peak resident memory and each process's open descriptors at start, warm and end
             (see bench/url_fetch.py)

Just the data-prep comparison (a few minutes on 2 cores):
  .venv/bin/python -m bench.run --dataprep-only [--dataprep-samples 5000] [--dataprep-repeats 3]
Just the checkpoint stall:
  .venv/bin/python -m bench.run --checkpoint-only [--checkpoint-steps 30] [--checkpoint-repeats 1]
Just the train.speed switches (a few minutes on 2 cores, most of it inductor compiling):
  .venv/bin/python -m bench.run --speed-only [--steps 5] [--speed-compile-backend none]
Just the trainer overhead (--overhead-vae-steps 800: a shorter VAE comparison; --no-overhead-vae: none):
  .venv/bin/python -m bench.run --overhead-only [--overhead-steps 80] [--overhead-vae-steps N] [--overhead-vae-seeds 2]
Just the latents group (and its loader rows; a few minutes on 2 cores):
  .venv/bin/python -m bench.run --latents-only
Just the ZeRO memory and sd15 rows (--zero-budget-gib: the per-rank budget of the largest-UNet search):
  .venv/bin/python -m bench.run --zero-only [--zero-budget-gib 3] [--no-sd15]
Just the URL table:
  .venv/bin/python -m bench.run --urls-only [--url-rows 100000] [--url-cap 900]
The GPU plan (bench/gpu.py, bench/GPU.md: sd15 images/s and MFU, the GPU-only risks), on a GPU machine:
  .venv/bin/python -m bench.run --gpu [--device cuda] [--budget-s 360]     (make bench-gpu)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    group: str
    case: str
    value: float
    unit: str
    ratio: float = 1.0
    """value / the baseline's value (higher is faster)."""
    ratio_to: str | None = None
    """The case in this group the ratio is to; None: the group's first row."""
    note: str = ""


def best_of(fn, repeats: int = 3) -> float:
    """Fastest of `repeats` timings: the least disturbed by other load on a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_shard(work: Path, n: int) -> list[Row]:
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    generate_synthetic(work / "raw", n, seed=0, image_size=64)
    rows = []
    for fmt in ("jpg", "png", "webp"):
        def run(fmt=fmt):
            build_shards(ShardConfig(source=str(work / "raw"), output=str(work / f"shards-{fmt}"), resolution=64,
                                     samples_per_shard=256, image_format=fmt, overwrite=True, progress=False))
        rows.append(Row("shard", f"write {fmt}", n / best_of(run, 2), "samples/s"))
    return rows


def bench_loader(work: Path, batches: int) -> list[Row]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from data_prep.dataset import read_dataset
    from training.loader.stream import ShardStream
    from training.loader.tar_reader import open_shards

    shards = str(work / "shards-jpg")
    dataset = read_dataset(shards)
    urls = [s.uri for s in dataset.shards]

    def raw():
        for _ in group_by_keys(tar_file_expander(open_shards(urls))):
            pass

    def decoded():
        it = iter(ShardStream(shards, rank=0, world_size=1, batch_size=8, resolution=64, seed=0,
                              shuffle_buffer=256, dataset=dataset))
        for _ in range(batches):
            next(it)

    return [
        Row("loader", "read tars (no decode)", dataset.total_samples / best_of(raw), "samples/s"),
        Row("loader", "ShardStream batches", batches * 8 / best_of(decoded), "samples/s"),
    ]


def bench_step(steps: int) -> list[Row]:
    import torch

    from training.config import load_config
    from training.models.assembly import build_components
    from training.tasks.diffusion_loss import diffusion_loss

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny.yaml")
    parts = build_components(cfg.model, seed=0)
    opt = torch.optim.AdamW(parts.unet.parameters(), lr=1e-4)
    rows = []
    for batch in (8, 16, 32):
        latents = torch.randn(batch, 4, cfg.model.latent_size, cfg.model.latent_size)
        states = torch.randn(batch, cfg.model.text_encoder.max_length, parts.text.hidden_size)

        def run(latents=latents, states=states):
            for _ in range(steps):
                loss = diffusion_loss(parts.unet, parts.noise_scheduler, latents, states, torch.Generator())
                opt.zero_grad()
                loss.backward()
                opt.step()

        run()  # warm-up
        rows.append(Row("step", f"tiny UNet fwd+bwd+AdamW, batch {batch}", batch * steps / best_of(run, 2),
                        "samples/s"))
    return rows


def bench_deepspeed(work: Path, steps: int) -> list[Row]:
    from training.config import load_config
    from training.runtime.driver import train

    root = Path(__file__).resolve().parents[1]
    rows = []
    for stage in (0, 2, 3):
        cfg = load_config(root / "configs/tiny.yaml", [
            f"train.zero_stage={stage}", f"train.max_steps={steps}", f"train.log_every={steps}",
            f"train.checkpoint_every={steps}", f"train.ema.enabled={'false' if stage == 3 else 'true'}",
            f"tracking.run_name=bench-zero{stage}",
        ])
        outcome = train(cfg, str(work / "shards-jpg"))
        rows.append(Row("deepspeed", f"2 Ray workers, ZeRO-{stage}", outcome.metrics["samples_per_sec"],
                        "samples/s"))
    return rows


def bench_dataprep(work: Path, n: int, repeats: int) -> tuple[list[Row], dict]:
    """Rows for the data-prep group, and the details (every timed run, commands, derived ratios) for the JSON."""
    from bench.dataprep import CEILING, PROCESS_COUNTS
    from bench.dataprep import bench_dataprep as measure

    def label(tool: str, processes: int) -> str:
        return f"{tool} {processes} proc{'s' if processes > 1 else ''}"

    result = measure(work, n, repeats=repeats)
    rows = []
    for tool in ("ldmflow", "img2dataset"):
        if tool in result.unavailable:
            rows.append(Row("dataprep", tool, math.nan, "images/s", math.nan,
                            note=f"not measured: {result.unavailable[tool]}"))
            continue
        for p in PROCESS_COUNTS:
            # ours against theirs at the same process count; theirs against their own lowest count
            ratio_to = label("img2dataset", p) if tool == "ldmflow" else label("img2dataset", PROCESS_COUNTS[0])
            rows.append(Row("dataprep", label(tool, p), result.best[(tool, p)], "images/s", ratio_to=ratio_to))
    lo, hi = PROCESS_COUNTS[0], PROCESS_COUNTS[-1]
    if (CEILING, hi) in result.best:
        rows.append(Row("dataprep", CEILING, result.best[(CEILING, hi)], "images/s", ratio_to=label("ldmflow", lo),
                        note="the machine's ceiling for 2 processes"))
    ratios = {
        f"ldmflow/img2dataset at {lo} proc": result.ratio(("ldmflow", lo), ("img2dataset", lo)),
        f"ldmflow/img2dataset at {hi} procs": result.ratio(("ldmflow", hi), ("img2dataset", hi)),
        f"ldmflow {hi} procs/{lo} proc": result.ratio(("ldmflow", hi), ("ldmflow", lo)),
        f"img2dataset {hi} procs/{lo} proc": result.ratio(("img2dataset", hi), ("img2dataset", lo)),
        f"machine ceiling ({CEILING})/ldmflow {lo} proc": result.ratio((CEILING, hi), ("ldmflow", lo)),
        f"ldmflow {hi} procs/machine ceiling": result.ratio(("ldmflow", hi), (CEILING, hi)),
    }
    details = {
        "samples": result.samples,
        "repeats": result.repeats,
        "ratios": ratios,
        "runs": [asdict(r) | {"images_per_s": r.images_per_s} for r in result.runs],
        "warmup_s": result.warmup_s,
        "warmup_images": result.warmup_images,
        "pixel_diff": result.pixel_diff,
        "pixel_diff_images": result.pixel_diff_images,
        "busy_cores_other": result.busy_cores,
        "commands": result.commands,
        "unavailable": result.unavailable,
    }
    return rows, details


def bench_checkpoint(work: Path, steps: int, every: int, repeats: int) -> tuple[list[Row], dict]:
    """Rows for the checkpoint group (milliseconds; each ratio is to the normal step of the same mode's
    runs, so "x a normal step"), and the details (every step's timing, sizes, medians) for the JSON."""
    from bench.checkpoint_stall import measure

    result = measure(work, steps=steps, every=every, repeats=repeats)
    if result.unavailable:
        return [Row("checkpoint", "checkpoint stall", math.nan, "ms", math.nan,
                    note=f"not measured: {result.unavailable}")], {"unavailable": result.unavailable}
    rows = []
    summaries = {}
    size = f"{result.checkpoint_bytes() / 2**20:.0f} MiB checkpoint"
    for mode in ("sync", "async"):
        s = summaries[mode] = result.summary(mode)
        normal = f"normal step, {mode} run"
        rows += [
            # The async run's normal step against the sync run's: ~1.0 when both ran under the same load.
            Row("checkpoint", normal, s.normal_s * 1e3, "ms", note=f"median of {s.normal_count} steps",
                ratio_to=None if mode == "sync" else "normal step, sync run"),
            Row("checkpoint", f"checkpoint step, {mode} upload", s.checkpoint_step_s * 1e3, "ms", ratio_to=normal,
                note=f"x a normal step; step + save_and_report {s.save_and_report_s * 1e3:.0f} ms, "
                     f"median of {s.checkpoint_count}; {size}"),
            Row("checkpoint", f"step after a checkpoint, {mode} upload", s.after_s * 1e3, "ms", ratio_to=normal,
                note=f"x a normal step; rank 0's own: {s.after_rank0_ratio:.2f}x"),
        ]
    details = {
        "steps": result.steps,
        "checkpoint_every": result.every,
        "samples": result.samples,
        "repeats": result.repeats,
        "checkpoint_steps_counted": result.checkpoint_steps(),
        "normal_steps_counted": result.normal_steps(),
        "interval_starts_counted": result.interval_starts(),
        "checkpoint_bytes": result.checkpoint_bytes(),
        "final_checkpoint_bytes": result.final_checkpoint_bytes(),
        "s3_startup_s": result.s3_startup_s,
        "summary": {mode: s.to_dict() for mode, s in summaries.items()},
        "runs": [asdict(r) for r in result.runs],
    }
    return rows, details


def bench_urls(work: Path, rows: int, cap_s: int) -> tuple[list[Row], dict]:
    """The URL group's row (rows/s; its notes: peak memory, descriptors) and its details for the JSON."""
    from bench.url_fetch import bench_urls as measure

    result = measure(work, rows, cap_s)
    case = f"ldmflow shard, {rows} URL rows, {result.processes} procs"
    details = asdict(result) | {"rows_per_s": result.rows_per_s}
    if result.unavailable:
        return [Row("urls", case, math.nan, "rows/s", math.nan, note=f"not measured: {result.unavailable}")], details
    fds = ", ".join(f"{p['role']} {p['fds_first']}/{p['fds_warm']}/{p['fds_last']}" for p in result.processes_seen)
    note = f"peak RSS {result.peak_tree_rss_bytes / 2**20:.0f} MiB summed; fds first/warm/last: {fds}"
    return [Row("urls", case, result.rows_per_s, "rows/s", note=note)], details


def print_urls(details: dict) -> None:
    if details["unavailable"]:
        return
    print(f"\nurls ({details['rows']} rows from a local HTTP server, {details['processes']} processes): "
          f"{details['seconds']:.1f} s wall, {details['rows_per_s']:.0f} rows/s, {details['written']} written, "
          f"skipped {details['skipped'] or 'none'}, {details['served']} requests served")
    print(f"  peak RSS of the tree (summed, shared pages in each): {details['peak_tree_rss_bytes'] / 2**20:.0f} MiB")
    for p in details["processes_seen"]:
        print(f"  {p['role']:<6} pid {p['pid']}: open fds {p['fds_first']} at start, {p['fds_warm']} warm, "
              f"{p['fds_last']} at end (max {p['fds_max']}); peak RSS {p['peak_rss_bytes'] / 2**20:.0f} MiB; "
              f"{p['cpu_s']:.1f} CPU s")
    before, after = details["busy_cores_other"]
    print(f"  the server (this process) used {details['server_cpu_s']:.1f} CPU s; other processes kept {before:.1f} "
          f"and {after:.1f} of {os.cpu_count()} cores busy just before and after")


def print_checkpoint(details: dict) -> None:
    if "unavailable" in details:
        return
    every = details["checkpoint_every"]
    print(f"\ncheckpoint stall ({details['steps']} steps, a checkpoint every {every}, {details['repeats']} run(s) per "
          "mode; medians, the final checkpoint left out)")
    for mode, s in details["summary"].items():
        print(f"  {mode:<5} upload: checkpoint step {s['checkpoint_step_s']:.2f} s = {s['stall_ratio']:.2f}x a normal "
              f"step ({s['normal_s']:.3f} s), of which save_and_report {s['save_and_report_s']:.2f} s")
        print(f"               step after: {s['after_ratio']:.2f}x (rank 0's own {s['after_rank0_ratio']:.2f}x); "
              f"all in, a checkpoint costs {s['checkpoint_cost_s']:.2f} s = {s['checkpoint_cost_steps']:.1f} normal "
              f"steps (rank 0's clock over a checkpoint + {every} steps, mean of {s['interval_count']})")
    print(f"  checkpoint size in S3: {details['checkpoint_bytes'] / 2**20:.1f} MiB (both ranks; the final one, "
          f"with the gathered UNet: {details['final_checkpoint_bytes'] / 2**20:.1f} MiB)")


def run_gpu_plan(argv: list[str]) -> int:
    """`--gpu`: bench/gpu.py with the remaining arguments (its own groups, table and JSON)."""
    from bench.gpu import main as gpu_main

    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv = [*argv, "--out", "bench/results/gpu.json"]
    return gpu_main(argv)


def with_ratios(rows: list[Row]) -> list[Row]:
    baselines: dict[str, float] = {}
    values = {(row.group, row.case): row.value for row in rows}
    for row in rows:
        baselines.setdefault(row.group, row.value)
        base = baselines[row.group] if row.ratio_to is None else values.get((row.group, row.ratio_to), math.nan)
        row.ratio = row.value / base if base else math.nan
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(r.case) for r in rows)
    print(f"{'group':<10} {'case':<{width}} {'value':>12} {'unit':<10} {'ratio':>7}")
    for r in rows:
        vs = f"  vs {r.ratio_to}" if r.ratio_to and r.ratio_to != r.case else ""
        note = f"  ({r.note})" if r.note else ""
        value = "-" if math.isnan(r.value) else f"{r.value:.1f}"
        ratio = "-" if math.isnan(r.ratio) else f"{r.ratio:.2f}"
        print(f"{r.group:<10} {r.case:<{width}} {value:>12} {r.unit:<10} {ratio:>6}x{vs}{note}")


def print_ratios(title: str, ratios: dict[str, float | None]) -> None:
    print(f"\n{title}")
    for name, value in ratios.items():
        print(f"  {name:<52} {'n/a' if value is None else f'{value:.2f}x'}")


def _json_safe(value):
    """NaN (a tool not measured) as null: json.dumps would write NaN, which strict JSON readers reject."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512, help="synthetic samples to shard and stream")
    p.add_argument("--steps", type=int, default=5, help="train steps per timing")
    p.add_argument("--deepspeed", action="store_true", help="also time the Ray + DeepSpeed loop (minutes)")
    p.add_argument("--dataprep-samples", type=int, default=5000,
                   help="512x512 JPEGs for the ldmflow vs img2dataset group")
    p.add_argument("--dataprep-repeats", type=int, default=3,
                   help="timed runs per tool and process count, interleaved; the best counts")
    p.add_argument("--no-dataprep", action="store_true", help="skip the ldmflow vs img2dataset group")
    p.add_argument("--checkpoint-steps", type=int, default=30, help="train steps per checkpoint-group run")
    p.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints there")
    p.add_argument("--checkpoint-repeats", type=int, default=1,
                   help="sync + async run pairs in the checkpoint group, interleaved")
    p.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint-stall group")
    p.add_argument("--overhead-steps", type=int, default=80, help="train steps per side of the overhead throughput")
    p.add_argument("--overhead-vae-seeds", type=int, default=2,
                   help="seeds of the shapes-vae PSNR comparison, each run both ways (about 20 minutes per seed)")
    p.add_argument("--overhead-vae-steps", type=int, default=None,
                   help="steps of the shapes-vae PSNR comparison (default: the recipe's 4000)")
    p.add_argument("--no-overhead-vae", action="store_true", help="skip the shapes-vae PSNR comparison")
    p.add_argument("--no-overhead", action="store_true", help="skip the overhead group")
    p.add_argument("--zero-budget-gib", type=float, default=3.0,
                   help="per-rank memory budget of the zero group's largest-UNet search")
    p.add_argument("--no-sd15", action="store_true", help="leave the sd15 row out of the zero group")
    p.add_argument("--no-zero", action="store_true", help="skip the zero group")
    p.add_argument("--url-rows", type=int, default=100_000, help="URL rows in the urls group")
    p.add_argument("--url-cap", type=int, default=900, help="seconds the urls group's shard run may take")
    p.add_argument("--no-urls", action="store_true", help="skip the urls group")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--dataprep-only", action="store_true", help="run only the ldmflow vs img2dataset group")
    only.add_argument("--checkpoint-only", action="store_true", help="run only the checkpoint-stall group")
    only.add_argument("--overhead-only", action="store_true", help="run only the trainer-overhead group")
    only.add_argument("--urls-only", action="store_true", help="run only the urls group")
    only.add_argument("--speed-only", action="store_true", help="run only the train.speed group")
    p.add_argument("--speed-compile-backend", default="inductor",
                   help="torch.compile backend of the speed group's compile rows; none leaves them out")
    only.add_argument("--latents-only", action="store_true", help="run only the latents group (bench/latents.py)")
    p.add_argument("--latents-config", action="append", default=None, metavar="YAML",
                   help="a config the latents group measures (repeatable; default: bench.latents.CONFIGS, "
                        "configs/shapes.yaml, configs/tiny.yaml and tiny with SD's VAE shape)")
    only.add_argument("--zero-only", action="store_true", help="run only the zero group (bench/zero_memory.py)")
    only.add_argument("--gpu", action="store_true",
                      help="run the GPU plan instead (bench/gpu.py; the other arguments go to it, --out defaults to "
                           "bench/results/gpu.json)")
    p.add_argument("--out", default="bench/results/latest.json")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu" in argv:
        return run_gpu_plan([a for a in argv if a != "--gpu"])
    args = p.parse_args(argv)
    one_group = (args.dataprep_only or args.checkpoint_only or args.urls_only or args.speed_only or args.overhead_only
                 or args.latents_only or args.zero_only)
    run_checkpoint = args.checkpoint_only or not (one_group or args.no_checkpoint)
    if run_checkpoint and (args.checkpoint_every < 3 or args.checkpoint_steps < 3 * args.checkpoint_every):
        p.error("--checkpoint-every must be >= 3 (normal steps between checkpoints) and --checkpoint-steps >= 3 x "
                "--checkpoint-every (a warm-up checkpoint, a counted one, the final one)")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    with tempfile.TemporaryDirectory(prefix="ldmflow-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("LDMFLOW_RUNS_DIR", str(work / "runs"))
        rows: list[Row] = []
        dataprep = checkpoint = urls = overhead = latents = zero = None
        every_group = not one_group
        if every_group:
            rows += bench_shard(work, args.samples)
            rows += bench_loader(work, batches=args.samples // 8)
            rows += bench_step(args.steps)
        if args.speed_only or every_group:
            from bench.speed_habits import bench_speed

            backend = None if args.speed_compile_backend == "none" else args.speed_compile_backend
            rows += bench_speed(args.steps, backend)
        if every_group or args.latents_only:
            from bench.latents import CONFIGS, bench_latents

            latents = {}
            chosen = {Path(c).stem: (c, []) for c in args.latents_config} if args.latents_config else CONFIGS
            for label, (config, overrides) in chosen.items():
                latent_rows, latents[label] = bench_latents(work, config=config, overrides=overrides, label=label)
                rows += latent_rows
        if args.dataprep_only or (every_group and not args.no_dataprep):
            dataprep_rows, dataprep = bench_dataprep(work, args.dataprep_samples, args.dataprep_repeats)
            rows += dataprep_rows
        if args.deepspeed and every_group:
            rows += bench_deepspeed(work, steps=max(10, args.steps * 4))
        if run_checkpoint:
            checkpoint_rows, checkpoint = bench_checkpoint(work, args.checkpoint_steps, args.checkpoint_every,
                                                           args.checkpoint_repeats)
            rows += checkpoint_rows
        if args.overhead_only or (every_group and not args.no_overhead):
            from bench.overhead import bench_overhead

            overhead_rows, overhead = bench_overhead(work, steps=args.overhead_steps, vae_steps=args.overhead_vae_steps,
                                                     vae=not args.no_overhead_vae, vae_seeds=args.overhead_vae_seeds)
            rows += overhead_rows
        if args.zero_only or (every_group and not args.no_zero):
            from bench.zero_memory import bench_zero

            zero_rows, zero = bench_zero(work, budget_gib=args.zero_budget_gib, sd15=not args.no_sd15)
            rows += zero_rows
        if args.urls_only or (every_group and not args.no_urls):
            url_rows, urls = bench_urls(work, args.url_rows, args.url_cap)
            rows += url_rows
    rows = with_ratios(rows)
    print_table(rows)
    if urls is not None:
        print_urls(urls)
    for each in (latents or {}).values():
        print_ratios(f"latents ratios ({each['label']}: {each['config']} {' '.join(each['overrides'])}, batch "
                     f"{each['batch_size']}, best windows)", each["ratios"])
    if zero is not None:
        print_ratios(f"zero ratios ({zero['world_size']} ranks; memory: lower is better)", zero["ratios"])
    if checkpoint is not None:
        print_checkpoint(checkpoint)
    if dataprep is not None:
        print_ratios(f"dataprep ratios ({dataprep['samples']} images, best of {dataprep['repeats']} interleaved "
                     "runs each)", dataprep["ratios"])
        # Both tools' fixed cost (interpreter, imports, worker start) is inside every timed run; shown so a
        # reader can judge how much of a ratio at this --dataprep-samples is start-up rather than throughput.
        warm = ", ".join(f"{tool} {s:.1f}s" for tool, s in dataprep["warmup_s"].items())
        print(f"  start-up included above: a {dataprep['warmup_images']}-image run takes {warm}")
        busy = max(dataprep["busy_cores_other"], default=0.0)
        if busy > 0.2:
            print(f"  other processes kept {busy:.1f} of {os.cpu_count()} cores busy around the group: the 2-process "
                  "rows and the scaling ratios are understated")
        if dataprep["pixel_diff"] is not None:
            print(f"  same work: their warm-up images ({dataprep['pixel_diff_images']} sources in both) differ by "
                  f"{dataprep['pixel_diff']:.1f} grey levels on average (tens would mean another crop or size)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe({
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "args": vars(args),
        "rows": [asdict(r) for r in rows],
        "dataprep": dataprep,
        "checkpoint": checkpoint,
        "urls": urls,
        "overhead": overhead,
        "latents": latents,
        "zero": zero,
    }), indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
