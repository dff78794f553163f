"""place_optimizer_steps: Adam's `step` after DeepSpeed's universal load, put where fused AdamW needs it.

DeepSpeed 0.19.8's universal loader assigns `state["step"]` from a tensor torch.load put on the CPU;
fused AdamW on CUDA expects it on the parameters' device. No GPU here, so the parameters live on the
meta device (another device than the CPU step, as CUDA is on a GPU machine) for the placement, and a
real fused AdamW on the CPU takes a step after the fix.
"""

from __future__ import annotations

import torch

from training.checkpoint.elastic import place_optimizer_steps


def _loaded_like_deepspeed(optimizer: torch.optim.Optimizer, step) -> None:
    """What load_hp_checkpoint_state_from_checkpoint_dir does: state set directly, step as loaded."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def test_fused_steps_move_to_the_parameters_device():
    params = [torch.nn.Parameter(torch.zeros(4, 3, device="meta")), torch.nn.Parameter(torch.zeros(5, device="meta"))]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    _loaded_like_deepspeed(opt, torch.tensor(7.0, dtype=torch.float64))  # a CPU tensor, as torch.load returns it
    assert {opt.state[p]["step"].device.type for p in params} == {"cpu"}

    assert place_optimizer_steps(opt) == 2
    for p in params:
        step = opt.state[p]["step"]
        assert step.device == p.device and step.dtype == torch.float32
    assert place_optimizer_steps(opt) == 0  # already placed: nothing to change


def test_non_fused_steps_stay_where_torch_keeps_them():
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = torch.optim.AdamW([p], lr=1e-3)
    _loaded_like_deepspeed(opt, torch.tensor(7.0))
    assert place_optimizer_steps(opt) == 0
    assert opt.state[p]["step"].device.type == "cpu"


def test_fused_adamw_steps_after_a_plain_number_step_is_placed():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8))
    opt = torch.optim.AdamW([p], lr=1e-2, fused=True)
    _loaded_like_deepspeed(opt, 3)  # an int step, as older checkpoints store it
    place_optimizer_steps(opt)
    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].device == p.device
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.state[p]["step"]) == 4.0
    assert not torch.equal(p.detach(), before)
