"""Benchmarks: ``make bench`` (or ``python -m bench.run``) prints a table and writes JSON.

Machines here are shared and noisy, so each group is measured side by side in one run and reported
as a ratio to the group's baseline; absolute numbers are for orientation only.

Groups:
  shard    - shard writing throughput per image format (baseline: jpg)
  loader   - per-rank batch stream: decoded batches vs reading the tars alone (baseline: raw read)
  step     - tiny-preset UNet train step, single process, per batch size (baseline: batch 8)
  deepspeed (--deepspeed) - the real Ray Train + DeepSpeed loop, 2 workers, ZeRO stage 0 vs 2 vs 3
"""

from __future__ import annotations

import argparse
import json
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
    """value / the group's baseline value (higher is faster)."""


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
                                     samples_per_shard=256, image_format=fmt, overwrite=True))
        rows.append(Row("shard", f"write {fmt}", n / best_of(run, 2), "samples/s"))
    return rows


def bench_loader(work: Path, batches: int) -> list[Row]:
    import webdataset as wds

    from data_prep.manifest import read_manifest
    from training.shard_loader import ShardStream

    shards = work / "shards-jpg"
    manifest = read_manifest(shards)
    urls = [str(shards / s.name) for s in manifest.shards]

    def raw():
        for _ in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            pass

    def decoded():
        it = iter(ShardStream(str(shards), rank=0, world_size=1, batch_size=8, resolution=64, seed=0,
                              shuffle_buffer=256, manifest=manifest))
        for _ in range(batches):
            next(it)

    return [
        Row("loader", "read tars (no decode)", manifest.total_samples / best_of(raw), "samples/s"),
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


def with_ratios(rows: list[Row]) -> list[Row]:
    baselines: dict[str, float] = {}
    for row in rows:
        baselines.setdefault(row.group, row.value)
        row.ratio = row.value / baselines[row.group] if baselines[row.group] else float("nan")
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(r.case) for r in rows)
    print(f"{'group':<10} {'case':<{width}} {'value':>12} {'unit':<10} {'ratio':>7}")
    for r in rows:
        print(f"{r.group:<10} {r.case:<{width}} {r.value:>12.1f} {r.unit:<10} {r.ratio:>6.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512, help="synthetic samples to shard and stream")
    p.add_argument("--steps", type=int, default=5, help="train steps per timing")
    p.add_argument("--deepspeed", action="store_true", help="also time the Ray + DeepSpeed loop (minutes)")
    p.add_argument("--out", default="bench/results/latest.json")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    with tempfile.TemporaryDirectory(prefix="ldmflow-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("LDMFLOW_RUNS_DIR", str(work / "runs"))
        rows = bench_shard(work, args.samples)
        rows += bench_loader(work, batches=args.samples // 8)
        rows += bench_step(args.steps)
        if args.deepspeed:
            rows += bench_deepspeed(work, steps=max(10, args.steps * 4))
    rows = with_ratios(rows)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "args": vars(args),
        "rows": [asdict(r) for r in rows],
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
