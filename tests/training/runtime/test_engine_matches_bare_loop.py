"""The worker's DeepSpeed engine (training.runtime.engine.build_engine) takes the same optimizer steps as a
bare PyTorch loop: torch AdamW with train.lr / weight_decay, the warm-up + cosine LambdaLR stepped once
per optimizer step, torch.nn.utils.clip_grad_norm_ at train.grad_clip. This is what bench/overhead.py's
bare loop assumes, and what rules the trainer's own math out as a cause of a quality gap (issue 15,
item 4): a different clip, Adam eps, a scheduler stepped per micro-batch or a ZeRO flattening that
changed the update would all fail here.

One rank over a gloo group of 1 (the process_group fixture), without Ray; a thin shapes-vae model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import load_config
from training.loader.batch import Batch
from training.runtime.context import WorkerContext
from training.runtime.engine import build_engine, deepspeed_config, lr_lambda
from training.runtime.single_rank import SINGLE_RANK_ZERO, single_rank_config
from training.tasks import build_task

ROOT = Path(__file__).resolve().parents[3]
STEPS = 8


def vae_config(stage: int, grad_accum: int):
    # A clip low enough to bite on every step, and a warm-up shorter than the run so the cosine part
    # of the schedule is exercised too.
    return load_config(ROOT / "configs/shapes-vae.yaml", [
        "train.num_workers=1", f"train.zero_stage={stage}", f"train.grad_accum={grad_accum}",
        "train.grad_clip=0.05", "train.warmup_steps=3", f"train.max_steps={STEPS}", "train.weight_decay=0.1",
        "model.vae.block_out_channels=[8,16]", "model.vae.latent_channels=4", "model.vae.norm_num_groups=4",
        "model.resolution=16",
    ])


def batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(7)
    return [Batch(pixels=torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g), captions=[""] * 4,
                  keys=[f"k{i}-{j}" for j in range(4)], epochs=[0] * 4, stream=0, state={}) for i in range(n)]


def bare_steps(cfg, data: list[Batch]) -> tuple[dict[str, torch.Tensor], list[float]]:
    train = cfg.train
    task = build_task(cfg, seed=train.seed, device=torch.device("cpu"))
    module = task.module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    generator, lrs, it = torch.Generator().manual_seed(0), [], iter(data)
    for _ in range(STEPS):
        for _ in range(train.grad_accum):
            (task.loss(module, next(it), generator) / train.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, lrs


def engine_steps(cfg, data: list[Batch]) -> tuple[dict[str, torch.Tensor], list[float]]:
    train = cfg.train
    ctx = WorkerContext(0, 1, torch.device("cpu"))
    task = build_task(cfg, seed=train.seed, device=ctx.device)
    engine = build_engine(task.module, train, ctx)
    if train.zero_stage in (1, 2):  # the single-rank settings and paths are what is compared with the bare loop
        assert {k: engine.ldmflow_config["zero_optimization"][k] for k in SINGLE_RANK_ZERO} == SINGLE_RANK_ZERO
        assert engine.zero_optimization_stage() == 1
        assert "allreduce_and_copy" in vars(engine.optimizer) and "get_grad_norm_direct" in vars(engine.optimizer)
    generator, lrs, it = torch.Generator().manual_seed(0), [], iter(data)
    for _ in range(STEPS):
        for _ in range(train.grad_accum):  # as Trainer.train_step: DeepSpeed steps at the boundary
            loss = task.loss(engine, next(it), generator)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                lrs.append(engine.get_lr()[0])
            engine.step()
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}, lrs


@pytest.mark.parametrize(("stage", "grad_accum"), [(0, 1), (1, 1), (2, 1), (2, 2)])
def test_engine_steps_equal_a_bare_torch_loop(process_group, stage, grad_accum):
    cfg = vae_config(stage, grad_accum)
    data = batches(STEPS * grad_accum)
    bare, bare_lrs = bare_steps(cfg, data)
    ours, our_lrs = engine_steps(cfg, data)
    assert our_lrs == pytest.approx(bare_lrs, rel=1e-12)
    assert len(set(bare_lrs)) == STEPS  # warm-up then cosine: a new rate every step
    start = build_task(cfg, seed=cfg.train.seed, device=torch.device("cpu")).module.state_dict()
    moved = max(float((bare[k] - start[k]).abs().max()) for k in bare)
    differs = max(float((bare[k] - ours[k]).abs().max()) for k in bare)
    assert moved > 1e-3  # the steps did change the weights
    # Summation order differs (flat buffers vs per-parameter); the updates agree to float32 rounding.
    assert differs < 1e-3 * moved, (differs, moved)


def test_single_rank_settings_only_on_one_rank_of_zero_1_2_and_extra_wins():
    cfg = vae_config(2, 1)
    one = single_rank_config(deepspeed_config(cfg.train), cfg.train, world_size=1)
    assert {k: one["zero_optimization"][k] for k in SINGLE_RANK_ZERO} == SINGLE_RANK_ZERO
    two_ranks = single_rank_config(deepspeed_config(cfg.train), cfg.train, world_size=2)
    no_zero = single_rank_config(deepspeed_config(vae_config(0, 1).train), vae_config(0, 1).train, world_size=1)
    for other, stage in ((two_ranks, 2), (no_zero, 0)):
        assert not {"contiguous_gradients", "reduce_scatter"} & set(other["zero_optimization"])
        assert other["zero_optimization"]["stage"] == stage
    told = load_config(ROOT / "configs/shapes-vae.yaml", [
        "train.num_workers=1", "train.deepspeed.extra.zero_optimization.contiguous_gradients=true"])
    kept = single_rank_config(deepspeed_config(told.train), told.train, world_size=1)["zero_optimization"]
    assert kept["contiguous_gradients"] is True and kept["reduce_scatter"] is False


def test_one_rank_gradient_norm_is_deepspeeds_and_marks_overflow(process_group):
    cfg = vae_config(2, 1)
    engine = build_engine(build_task(cfg, seed=0, device=torch.device("cpu")).module, cfg.train,
                          WorkerContext(0, 1, torch.device("cpu")))
    optimizer = engine.optimizer
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=g) for n in (5, 300, 7)]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    deepspeeds = type(optimizer).get_grad_norm_direct(optimizer, grads, params)
    assert float(optimizer.get_grad_norm_direct(grads, params)) == pytest.approx(float(deepspeeds), rel=1e-6)
    padding = torch.full((4,), 9.0)
    padding._zero_padding = True  # DeepSpeed's alignment padding is not part of the norm
    assert float(optimizer.get_grad_norm_direct([*grads, padding], params)) == pytest.approx(float(deepspeeds),
                                                                                           rel=1e-6)
    grads[1][0] = float("inf")
    assert float(optimizer.get_grad_norm_direct(grads, params)) == -1.0  # what DeepSpeed's overflow check reads
