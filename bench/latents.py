"""The `latents` group of `make bench` (bench/run.py; alone: `python -m bench.run --latents-only`): what
precomputed latents (`ldmflow encode`) buy, measured side by side in one run.

  latents - training samples/s from latent shards vs the raw shards they were encoded from, same model, for
            each of CONFIGS: the demo's LDM (configs/shapes.yaml: its UNet, frozen VAE shape and MiniLM text
            encoder, batch 16; 32 px images), the tiny preset (configs/tiny.yaml: 64 px images, batch 8), and
            the tiny preset with SD's VAE shape (a 34M-parameter encoder; the UNet then runs on 8x8 latents).
            Raw rows run the frozen VAE encoder and text encoder on every step (train.cache_encodings off:
            a dataset too big for the in-memory cache); a third row is the demo's own setting, the cache
            warm (every sample seen once before timing), which latents reach without holding the dataset
            in memory. Target: latents >= 2x raw where the encoders dominate the step.
  loader  - samples/s a ShardStream delivers from those raw and latent shards (one process: what one
            loader worker gives a rank) vs what that train step consumes from the same shards. Target >= 10x.

Each train-step row is the step the training loop runs (training.runtime.loop: a ShardStream batch, decoded
ahead by the config's loader worker -> the ldm task's loss -> backward -> optimizer step) in this process,
with the worker's thread count (train.cpus_per_worker) and plain AdamW: the ratio isolates what the data
costs per step; Ray and DeepSpeed add the same per-step overhead to both (the `deepspeed` and trainer-overhead
groups measure that). The modes take turns on one model and optimizer: each mode's warm-up (loader start, the
first steps, the cache's epoch) runs before any timed window, then `repeats` rounds of one window per mode;
the best window counts (the least disturbed on a shared machine), the median is noted. Encoding is a one-off
cost, outside the windows; its time is in the JSON and the latent row's note.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = "{}: train step, raw shards (encoders every step)"
CACHED = "{}: train step, raw shards, encoder cache warm"
LATENT = "{}: train step, latent shards"
CONSUMES = "{}: train step consumes, {} shards"
DELIVERS = "{}: ShardStream delivers, {} shards"
SD_VAE = ["model.vae.block_out_channels=[128,256,512,512]", "model.vae.layers_per_block=2"]
"""SD 1.x/2.x's VAE shape (sd-vae-ft-mse: a 34M-parameter encoder, 8x downsampling), random weights."""
CONFIGS = {"shapes": ("configs/shapes.yaml", []), "tiny": ("configs/tiny.yaml", []),
           "tiny, SD VAE": ("configs/tiny.yaml", SD_VAE)}
"""What `make bench` measures, by row label: the demo's LDM and the tiny preset, whose small encoders cost
less than their UNet's step (a 0.37M-parameter VAE encoder), and the tiny preset's UNet under the VAE that
SD-family models train with, which costs several times the UNet's step at 64 px: the case the issue's
2x target assumes (the encoder dominating a small UNet's step)."""


def bench_latents(work: Path, *, config: str = "configs/shapes.yaml", overrides: list[str] | None = None,
                  label: str | None = None, samples: int = 256, steps: int = 12, repeats: int = 3, warmup: int = 3,
                  loader_batches: int = 48) -> tuple[list, dict]:
    """Rows for the `latents` and `loader` groups (bench.run.Row), named after `label` (default: the config's
    name), and the details for the JSON."""
    import torch

    from bench.overhead import shapes_shards
    from bench.run import Row
    from training.config import load_config
    from training.encode.job import encode_dataset
    from training.loader.stream import ShardStream
    from training.models.assembly import build_components
    from training.tasks.ldm import LatentDiffusionTask

    overrides = list(overrides or [])
    cfg = load_config(ROOT / config, [*overrides, "train.cache_encodings=false"])
    cached_cfg = load_config(ROOT / config, [*overrides, "train.cache_encodings=true"])
    train, resolution = cfg.train, cfg.model.resolution
    label = label or cfg.name
    raw_mode, cached_mode, latent_mode = (template.format(label) for template in (RAW, CACHED, LATENT))
    # The raw shards are made once per resolution and shared by the configs that train at it.
    raw = shapes_shards(work, samples, resolution, samples_per_shard=64)
    latent = str(work / ("latents-" + re.sub(r"[^A-Za-z0-9]+", "-", label)))
    threads = torch.get_num_threads()
    encoded = encode_dataset(cfg, raw, latent, workers=0)  # in this process, with all its threads: a one-off
    torch.set_num_threads(train.cpus_per_worker)  # as each training worker runs (training.runtime.loop)
    try:
        parts = build_components(cfg.model, seed=train.seed)
        device = torch.device("cpu")
        tasks = {raw_mode: LatentDiffusionTask(cfg, parts, device=device),
                 cached_mode: LatentDiffusionTask(cached_cfg, parts, device=device),
                 latent_mode: LatentDiffusionTask(cfg, parts, device=device)}
        optimizer = torch.optim.AdamW(parts.unet.parameters(), lr=train.lr)
        generator = torch.Generator().manual_seed(train.seed)

        def stream(data: str, loader_workers: int) -> ShardStream:
            return ShardStream(data, rank=0, world_size=1, batch_size=train.batch_size, resolution=resolution,
                               seed=train.seed, loader_workers=loader_workers, shuffle_buffer=train.shuffle_buffer,
                               holdout_fraction=cfg.validation.holdout_fraction)

        workers = train.loader_workers
        batches = {raw_mode: iter(stream(raw, workers)), cached_mode: iter(stream(raw, workers)),
                   latent_mode: iter(stream(latent, workers))}

        def window(mode: str, n: int) -> float:
            """Samples/s over `n` train steps of `mode`."""
            task, it = tasks[mode], batches[mode]
            seen = 0
            started = time.perf_counter()
            for _ in range(n):
                batch = next(it)
                loss = task.loss(parts.unet, batch, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(batch.keys)
            return seen / (time.perf_counter() - started)

        # Warm-up: the loader worker's start and first batches, the first steps' allocations; the cached
        # mode also sees every sample once (an epoch and a batch), so its timed steps hit the cache only.
        epoch_steps = math.ceil(samples / train.batch_size) + 1
        for mode in tasks:
            window(mode, epoch_steps if mode == cached_mode else warmup)
        rates: dict[str, list[float]] = {mode: [] for mode in tasks}
        for _ in range(repeats):
            for mode in tasks:
                rates[mode].append(window(mode, steps))
        cache_entries = len(tasks[cached_mode].cache)
        batches.clear()  # the loader workers end with their iterators

        # What one loader process delivers, no training: the same streams in this process.
        delivered: dict[str, list[float]] = {"raw": [], "latent": []}
        loaders = {"raw": iter(stream(raw, 0)), "latent": iter(stream(latent, 0))}
        for it in loaders.values():
            for _ in range(warmup):
                next(it)
        for _ in range(repeats):
            for kind, it in loaders.items():
                started = time.perf_counter()
                seen = sum(len(next(it).keys) for _ in range(loader_batches))
                delivered[kind].append(seen / (time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)

    best = {mode: max(r) for mode, r in rates.items()}
    median = {mode: statistics.median(r) for mode, r in rates.items()}
    setting = f"{cfg.name}, batch {train.batch_size}, {train.cpus_per_worker} thread(s)"

    def note(mode: str) -> str:
        return f"best of {repeats} x {steps} steps, median {median[mode]:.1f}; {setting}"

    encode_rate = encoded.samples / encoded.seconds if encoded.seconds else math.nan
    rows = [
        Row("latents", raw_mode, best[raw_mode], "samples/s", ratio_to=raw_mode, note=note(raw_mode)),
        Row("latents", latent_mode, best[latent_mode], "samples/s", ratio_to=raw_mode,
            note=note(latent_mode) + f"; encoding {encoded.samples} samples took {encoded.seconds:.1f} s once"),
        Row("latents", cached_mode, best[cached_mode], "samples/s", ratio_to=raw_mode,
            note=note(cached_mode) + f" ({cache_entries} samples held in memory)"),
    ]
    for kind, mode in (("raw", raw_mode), ("latent", latent_mode)):
        consumes = CONSUMES.format(label, kind)
        rows += [
            Row("loader", consumes, best[mode], "samples/s", ratio_to=consumes, note=f"= '{mode}' above"),
            Row("loader", DELIVERS.format(label, kind), max(delivered[kind]), "samples/s", ratio_to=consumes,
                note=f"x what the step consumes; one process, best of {repeats} x {loader_batches} batches of "
                     f"{train.batch_size}"),
        ]
    details = {
        "config": config,
        "overrides": overrides,
        "label": label,
        "samples": samples,
        "batch_size": train.batch_size,
        "threads": train.cpus_per_worker,
        "loader_workers": train.loader_workers,
        "steps_per_window": steps,
        "repeats": repeats,
        "train_samples_per_s": rates,
        "loader_samples_per_s": delivered,
        "ratios": {
            "latent/raw train step": best[latent_mode] / best[raw_mode],
            "cache warm/raw train step": best[cached_mode] / best[raw_mode],
            "latent/cache warm train step": best[latent_mode] / best[cached_mode],
            "loader/train step, raw shards": max(delivered["raw"]) / best[raw_mode],
            "loader/train step, latent shards": max(delivered["latent"]) / best[latent_mode],
        },
        "encode": {"samples": encoded.samples, "shards": encoded.shards, "seconds": encoded.seconds,
                   "samples_per_s": encode_rate, "threads": threads},
    }
    return rows, details
