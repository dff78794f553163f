"""Benchmarks: ``make bench`` (or ``python -m bench.run``) prints a table and writes JSON.

Machines here are shared and noisy, so each group is measured side by side in one run and reported
as a ratio to the group's baseline; absolute numbers are for orientation only.

Groups:
  shard    - shard writing throughput per image format (baseline: jpg)
  loader   - per-rank batch stream: decoded batches vs reading the tars alone (baseline: raw read)
  step     - tiny-preset UNet train step, single process, per batch size (baseline: batch 8)
  dataprep - images/s of `ldmflow shard` vs img2dataset 1.47.0 (its own venv, .venv-img2dataset/, built on
             first use) on the same 512x512 JPEGs -> 256x256 centre-crop JPEG-95 tars, 1 and 2 processes each;
             each row's ratio is to the row named after it, and the scaling ratios print below the table
  deepspeed (--deepspeed) - the real Ray Train + DeepSpeed loop, 2 workers, ZeRO stage 0 vs 2 vs 3

Just the data-prep comparison (a few minutes on 2 cores):
  .venv/bin/python -m bench.run --dataprep-only [--dataprep-samples 5000] [--dataprep-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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
    from training.shard_loader import ShardStream, open_shards

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
    from training.models import build_components
    from training.objective import diffusion_loss

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
    from training.runner import train

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
    p.add_argument("--dataprep-only", action="store_true", help="run only the ldmflow vs img2dataset group")
    p.add_argument("--no-dataprep", action="store_true", help="skip the ldmflow vs img2dataset group")
    p.add_argument("--out", default="bench/results/latest.json")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    with tempfile.TemporaryDirectory(prefix="ldmflow-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("LDMFLOW_RUNS_DIR", str(work / "runs"))
        rows: list[Row] = []
        dataprep = None
        if not args.dataprep_only:
            rows += bench_shard(work, args.samples)
            rows += bench_loader(work, batches=args.samples // 8)
            rows += bench_step(args.steps)
        if not args.no_dataprep:
            dataprep_rows, dataprep = bench_dataprep(work, args.dataprep_samples, args.dataprep_repeats)
            rows += dataprep_rows
        if args.deepspeed and not args.dataprep_only:
            rows += bench_deepspeed(work, steps=max(10, args.steps * 4))
    rows = with_ratios(rows)
    print_table(rows)
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
    }), indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
