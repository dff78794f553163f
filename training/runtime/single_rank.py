"""DeepSpeed ZeRO-1/2 on a data-parallel group of one rank (a 1-worker run), without the work it does
for ranks that are not there.

On one rank ZeRO partitions nothing: the one partition is the whole model, and averaging gradients
over one rank is the identity. DeepSpeed 0.19.8 still does the multi-rank work, and on a small model
that work is a tenth of the step (issue 15, item 4; bench/overhead.py). What it costs, in one process
on the tiny preset's UNet (1 CPU thread, each against a bare torch loop of the same step, side by side):

  ZeRO-2 with DeepSpeed's defaults                         0.83
  + contiguous_gradients and reduce_scatter off            0.89      (a bucket copy per gradient)
  + no all-reduce of a group of one                        0.91      (flatten, all-reduce, copy back)
  + the gradient norm as torch's clip_grad_norm_ takes it  0.93      (a Python loop over parameters)
  + stage 1: no hook per parameter in the backward pass    0.96      (ZeRO-0: 0.97)

So a group of one gets all four (:func:`single_rank_config` and :func:`trim_single_rank`). None of
them changes an update (tests/training/runtime/test_engine_matches_bare_loop.py) or what a checkpoint
holds: stage 1 and 2 save the same flat partitions (the converter to universal checkpoints takes
both), so a 1-worker run resumes on more workers and back. ZeRO-0 would be faster still, but its
checkpoints hold the optimizer state unpartitioned in another file, which a ZeRO-2 run on two
workers cannot resume from.
"""

from __future__ import annotations

import copy
import logging

import torch

from training.config import TrainConfig

log = logging.getLogger(__name__)

SINGLE_RANK_ZERO = {"stage": 1, "contiguous_gradients": False, "reduce_scatter": False}
"""ZeRO settings for a group of one rank under ZeRO-1/2 without offload:
- stage 1: what stage 2 adds is partitioning the gradients, reduced as the backward pass produces
  them by a hook on every parameter; one rank has nothing to partition and pays for the hooks.
- contiguous_gradients copies every gradient into a bucket as it is produced (to keep GPU memory
  unfragmented across ranks' reductions); reduce_scatter splits a bucket's reduction by rank."""


def single_rank_config(config: dict, train: TrainConfig, world_size: int) -> dict:
    """`config` with SINGLE_RANK_ZERO's settings when `world_size` is 1 under ZeRO-1/2 without offload
    (train.deepspeed.extra setting contiguous_gradients or reduce_scatter keeps its own value);
    otherwise `config` itself."""
    zero = config.get("zero_optimization", {})
    if world_size != 1 or zero.get("stage", 0) not in (1, 2) or train.deepspeed.offloads():
        return config
    config = copy.deepcopy(config)
    zero = config["zero_optimization"]
    if zero["stage"] == 2:
        log.info("one worker: ZeRO-2 runs as ZeRO-1 (no gradients to partition across ranks; same updates and "
                 "checkpoints)")
    zero["stage"] = SINGLE_RANK_ZERO["stage"]
    for key in ("contiguous_gradients", "reduce_scatter"):
        zero.setdefault(key, SINGLE_RANK_ZERO[key])
    return config


def trim_single_rank(engine) -> bool:
    """Give the ZeRO-1/2 optimizer of `engine`, when its data-parallel group is one rank, the two
    one-rank paths DeepSpeed lacks: no gradient all-reduce, and the gradient norm in two fused ops
    instead of one op per parameter. True when it did; False (and nothing changed) for any other engine."""
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    if dist.get_world_size(group=optimizer.dp_process_group) != 1 or optimizer.has_moe_layers:
        return False
    # Both replace methods of this instance that DeepSpeed 0.19.8 calls with these signatures (the
    # version is pinned in constraints.txt); an upgrade that renames them makes this a no-op, not an error.
    if not (hasattr(optimizer, "allreduce_and_copy") and hasattr(optimizer, "get_grad_norm_direct")):
        return False

    def allreduce_and_copy(small_bucket, communication_data_type, rank=None, log=None, divide=True,
                           process_group=None, output_bucket=None):
        # The all-reduce of one rank's bucket, averaged over one rank, is the bucket: the gradients
        # are already where the copy back would put them. What DeepSpeed adds into a separate
        # partition buffer (output_bucket) is still added.
        for grad, out in zip(small_bucket, output_bucket or ()):
            if out is not None:
                out.add_(grad.to(out.dtype))

    def get_grad_norm_direct(gradients, params, norm_type=2):
        # DeepSpeed's loops over parameters (a norm kernel each, then an all-reduce of the sum); this
        # is torch.nn.utils.clip_grad_norm_'s: one fused norm over the list, in fp32. Padding that
        # DeepSpeed appends for alignment is zeros and left out, as DeepSpeed leaves it out.
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=optimizer.device)
        norms = torch._foreach_norm(grads, float(norm_type), dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms), float(norm_type))
        # As DeepSpeed: an inf or nan norm reads -1, which its overflow check and clipping expect.
        return total.masked_fill_(~total.isfinite(), -1.0)

    optimizer.allreduce_and_copy = allreduce_and_copy
    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True
