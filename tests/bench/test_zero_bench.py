"""bench/zero_memory.py: the zero group's trials run real 2-rank DeepSpeed engines in fresh processes and
measure them; its budget watchdog stops a trial that outgrows its budget; its search finds the largest
width that fits (the figures themselves are the bench's, not a test's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_config
from training.models.assembly import build_unet

from bench.zero_memory import GIB, ROOT, Trial, TrialResult, largest_fitting, params_at, run_trial, width_for, zero3


def _runner(limit: int):
    """A trial runner whose trials fit up to base width `limit`."""
    seen: list[int] = []

    def run(width: int) -> TrialResult:
        seen.append(width)
        return TrialResult(Trial(name="sim", width=width), ok=width <= limit)

    return run, seen


@pytest.mark.parametrize(("limit", "guess"), [(100, 112), (100, 64), (150, 96), (250, 288), (8, 48)])
def test_search_finds_the_largest_fitting_width(limit, guess):
    run, seen = _runner(limit)
    fit, fail, tried = largest_fitting(run, guess, max_trials=8)
    assert len(tried) == len(seen) <= 8 and all(w % 16 == 0 for w in seen)
    if limit < 16:
        assert fit is None and fail.trial.width == 16
    else:
        assert fit.trial.width == limit // 16 * 16 and fail.trial.width == fit.trial.width + 16


def test_search_stops_at_its_trial_count_and_its_cap():
    run, seen = _runner(10_000)
    fit, fail, _ = largest_fitting(run, 64, max_trials=8, max_width=320)
    # Never failing, it reports the cap as a lower bound (no fail) rather than growing without end.
    assert fit.trial.width == 320 and fail is None and max(seen) == 320
    run, seen = _runner(10_000)
    largest_fitting(run, 64, max_trials=2, max_width=320)
    assert len(seen) == 2


def test_width_for_inverts_the_parameter_count():
    assert width_for(params_at(192)) == 192 and width_for(params_at(192) * 0.99) == 176
    assert width_for(1) == 16


def test_zero3_nvme_trial_takes_its_steps_and_leaves_no_swap_files(tmp_path: Path):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    result = run_trial(zero3("tiny", 32, offload="nvme", nvme_path=str(nvme), steps=2), budget_bytes=4 * GIB,
                       timeout_s=300, wait_s=60)
    assert result.ok, result.reason
    # Every rank counts the whole UNet (its parameters' full sizes under zero.Init), as built in one piece.
    cfg = load_config(ROOT / "configs/sd15.yaml", result.trial.overrides())
    whole = build_unet(cfg.model.unet, sample_size=cfg.model.resolution // 8, in_channels=4,
                       cross_attention_dim=cfg.model.unet.cross_attention_dim, seed=0)
    assert [r.params for r in result.ranks] == [sum(p.numel() for p in whole.parameters())] * 2
    for rank in result.ranks:
        assert rank.steps_taken == 2 and len(rank.losses) == 2
        assert rank.baseline_bytes < rank.built_bytes <= rank.peak_bytes <= 4 * GIB
    assert list(nvme.iterdir()) == []  # the trial's swap folder went with it


def test_a_trial_over_its_budget_is_stopped_and_fails():
    # No rank can even import torch and DeepSpeed within 0.25 GiB: the watchdog kills both.
    result = run_trial(Trial(name="tiny0", width=32, steps=1), budget_bytes=GIB // 4, timeout_s=120, wait_s=60)
    assert not result.ok and result.reason.startswith("over budget")
    assert result.ranks == [] and result.watchdog_peak_bytes > GIB // 4
