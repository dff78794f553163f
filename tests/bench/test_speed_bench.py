"""bench/speed_habits.py: the speed group runs every train.speed switch on the tiny UNet's real train step
and reports each against the defaults (the figures themselves are the bench's, not a test's)."""

from __future__ import annotations

import math

import torch


def test_speed_group_rows_each_switch_against_the_defaults():
    from bench.run import with_ratios
    from bench.speed_habits import bench_speed

    # One thread (this machine is shared); inductor's minutes of compiling left out.
    threads = torch.get_num_threads()
    rows = with_ratios(bench_speed(steps=1, compile_backend=None, rounds=1, threads=1))
    assert torch.get_num_threads() == threads
    names = [r.case.removeprefix("tiny UNet step, ") for r in rows]
    assert names == ["defaults", "attention=math", "channels_last", "tf32", "fused_adamw=true", "all on"]
    assert all(r.group == "speed" and r.unit == "samples/s" and r.value > 0 and math.isfinite(r.ratio) for r in rows)
    assert rows[0].ratio == 1.0 and all(r.ratio_to == "tiny UNet step, defaults" for r in rows)
    # TF32 cannot act off CUDA Ampere+: the row says so rather than pass noise off as a gain.
    assert rows[3].note == "inert on cpu"
    # The bench leaves torch's process-wide defaults as it found them.
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
