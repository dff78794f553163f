"""bench/latents.py: the latents group encodes real raw shards with `ldmflow encode`'s job, trains the same
model from both, and reports each config's rows under its own name (the figures are the bench's, not a test's)."""

from __future__ import annotations

import math

import torch


def test_latents_group_measures_raw_cached_and_latent_steps_and_the_loader(tmp_path):
    from bench.latents import CACHED, CONSUMES, DELIVERS, LATENT, RAW, bench_latents
    from bench.run import with_ratios

    threads = torch.get_num_threads()
    rows, details = bench_latents(tmp_path, config="configs/tiny.yaml", samples=16, steps=1, repeats=1, warmup=1,
                                  loader_batches=1)
    rows = with_ratios(rows)
    assert torch.get_num_threads() == threads  # the worker's thread count is the bench's, not left behind
    by_case = {r.case: r for r in rows}
    raw, latent, cached = (label.format("tiny") for label in (RAW, LATENT, CACHED))
    assert [r.case for r in rows if r.group == "latents"] == [raw, latent, cached]
    assert by_case[latent].ratio_to == raw and by_case[cached].ratio_to == raw and by_case[raw].ratio == 1.0
    for kind in ("raw", "latent"):
        consumes, delivers = CONSUMES.format("tiny", kind), DELIVERS.format("tiny", kind)
        assert by_case[delivers].ratio_to == consumes and by_case[consumes].ratio == 1.0
    assert all(r.value > 0 and math.isfinite(r.ratio) for r in rows)
    # Every sample was encoded once, into the latent shards the latent rows read.
    assert details["encode"]["samples"] == 16 and details["encode"]["shards"] >= 1
    assert details["ratios"]["latent/raw train step"] == by_case[latent].value / by_case[raw].value
