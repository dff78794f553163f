"""The GPU plan (bench/gpu.py) end to end on the CPU: `--device cpu --preset tiny --quick` runs every
section through the CLI, so the one command run on a lent GPU machine is not found broken there.
The figures mean nothing on the CPU; what is checked is that each section measured what it names
(or, where a part cannot work on the CPU, recorded why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.slow  # ~50 s on 2 cores (70 s before --quick got cheaper), +40 s where DeepSpeed builds its CPU op
def test_gpu_plan_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--preset", "tiny", "--quick",
                           # 52 s alone here; the budget and timeout leave room for a loaded machine (240 s
                           # timed out while a demo ran beside the suite)
                           "--budget-s", "900", "--out", str(out)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench.gpu:" in proc.stdout and "img/s" in proc.stdout  # the table
    r = json.loads(out.read_text())

    assert _number(r["machine"]["matmul"]["tflops"]) and r["machine"]["matmul"]["tflops"] > 0

    train = r["train"]
    assert "error" not in train and train["params"] > 0
    assert {run["resolution"] for run in train["runs"]} == {64, 128}
    for run in train["runs"]:
        assert "error" not in run, run
        assert run["images_per_s"] > 0 and run["s_per_step"] > 0
        assert run["mfu_vs_peak"] > 0 and run["mfu_vs_matmul"] > 0
    flops = {f["resolution"]: f["flops_per_image"] for f in train["flops"]}
    # counted, not assumed: 4x the latent pixels costs about 4x (attention grows faster)
    assert flops[64] > 0 and 3.5 < flops[128] / flops[64] < 6

    ds = r["deepspeed"]
    assert "error" not in ds, ds.get("traceback")
    assert len(ds["losses_before_save"]) == 3 and all(_number(x) for x in ds["losses_before_save"])
    for label in ("without_fix", "with_fix"):
        attempt = ds[label]
        assert attempt["ok"] is True or attempt["error"], attempt
    fixed = ds["with_fix"]
    assert fixed["ok"], fixed
    assert fixed["weights_max_abs_diff"] == 0.0  # the universal round trip restored the saved weights exactly
    assert fixed["global_steps"] == 3 and len(fixed["losses_after_load"]) == 2

    det = r["determinism"]
    assert "error" not in det, det.get("traceback")
    for label in ("deterministic", "default"):
        entry = det[label]
        assert isinstance(entry.get("losses_identical"), bool) or entry["error"], entry
    assert det["deterministic"]["losses_identical"] is True  # one CPU process: deterministic kernels agree

    assert r["compile"]["skipped"]


def test_sd15_flops_per_image_counted_on_the_meta_device():
    """The FLOP count behind every MFU figure, for the real sd15 UNet (on the meta device: shapes, no
    compute): forward + backward at 512 px, 64x64 latents, is the ~2.4 TFLOP per image quoted for SD 1.x."""
    from bench.gpu import Spec, count_flops, scheduler

    spec = Spec.load("sd15")
    unet = spec.unet("meta")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    counted = count_flops(unet, scheduler(), spec, 512, "meta")
    assert 2.3e12 < counted["flops_per_image"] < 2.5e12
    # the backward's convolutions, not only the forward's, are in the count
    assert counted["by_op"]["aten.convolution_backward"] > counted["by_op"]["aten.convolution"] > 0
