"""The DeepSpeed engine around the trained module: its config, optimizer and LR schedule, the EMA
beside it, and gathering its full weights (a collective under ZeRO-3).
"""

from __future__ import annotations

import logging
import math

import torch

from training.checkpoint.elastic import deepspeed_universal_config
from training.config import TrainConfig
from training.config.deepspeed import generated_config
from training.errors import ConfigError
from training.runtime.context import WorkerContext
from training.runtime.deepspeed_checks import check_deepspeed
from training.runtime.jit_ops import load_deepspeed_ops
from training.runtime.single_rank import single_rank_config, trim_single_rank
from training.runtime.speed import apply_to_engine, apply_to_module, check_speed, fused_adamw, set_tf32

log = logging.getLogger(__name__)


def micro_batches(train: TrainConfig, world_size: int, global_batch: int) -> int:
    """Micro-batches each of `world_size` workers accumulates per step: what keeps `global_batch`
    with train.elastic_batch=global (ConfigError when it cannot divide), train.grad_accum with
    per_worker (the global batch then follows the worker count; logged when it changes)."""
    if train.elastic_batch == "per_worker":
        now = train.batch_size * train.grad_accum * world_size
        if now != global_batch:
            log.warning("the global batch changes from %d to %d (%d workers x batch %d x accumulation %d; "
                        "train.elastic_batch=per_worker); lr stays %g", global_batch, now, world_size,
                        train.batch_size, train.grad_accum, train.lr)
        return train.grad_accum
    per_step = train.batch_size * world_size
    if global_batch % per_step:
        raise ConfigError(f"the global batch of {global_batch} cannot be kept on {world_size} workers of batch "
                          f"{train.batch_size}: use a worker count that divides {global_batch // train.batch_size}, "
                          "or set train.elastic_batch=per_worker to let the global batch change")
    if global_batch // per_step != train.grad_accum:
        log.info("%d workers accumulate %d micro-batches each to keep the global batch of %d", world_size,
                 global_batch // per_step, global_batch)
    return global_batch // per_step


def deepspeed_config(train: TrainConfig) -> dict:
    """The DeepSpeed config of `train`: generated from train.* and train.deepspeed, with
    train.deepspeed.extra merged over it (training.config.deepspeed.generated_config)."""
    return generated_config(train)


def module_init(train: TrainConfig):
    """The context the trained module is built in: deepspeed.zero.Init with train.deepspeed.zero_init
    (ZeRO-3), which partitions each parameter across the ranks as soon as its layer is created (and
    puts the partition where offload_param says), so no rank ever holds the whole model; otherwise
    None. Every rank must enter it (it is collective). Only the trained module is built inside:
    the frozen VAE and text encoder are whole on every rank and never touched by DeepSpeed. None, not
    an empty context, when it is off: a pretrained UNet given a context is loaded partition-wise."""
    if not train.deepspeed.zero_init:
        return None
    import deepspeed

    load_deepspeed_ops()  # zero.Init starts deepspeed.comm, which loads the shared-memory op on CPU
    # Its config gives the partitions' dtype (bf16/fp16 as the engine trains) and device (offload_param).
    return deepspeed.zero.Init(config_dict_or_path=check_deepspeed(train))


def enable_activation_checkpointing(module: torch.nn.Module) -> None:
    """diffusers' gradient checkpointing on every diffusers model in `module` that supports it (the UNet;
    the `vae` task's AutoencoderKL): each block's activations are recomputed in the backward pass."""
    from diffusers import ModelMixin

    models = [m for m in module.modules() if isinstance(m, ModelMixin) and m._supports_gradient_checkpointing]
    if not models:
        raise ConfigError(f"config key `train.deepspeed.activation_checkpointing` is true but {type(module).__name__} "
                          "supports no gradient checkpointing: set it to false")
    for model in models:
        model.enable_gradient_checkpointing()


def lr_lambda(train: TrainConfig):
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        if train.lr_schedule == "cosine":
            progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_engine(unet: torch.nn.Module, train: TrainConfig, ctx: WorkerContext, *, load_universal: bool = False):
    """The DeepSpeed engine around `unet`; `load_universal` configures it to load a universal
    checkpoint (a resume on a different number of workers), which must be known before it is built."""
    import deepspeed

    config = check_deepspeed(train)  # one line for anything DeepSpeed would refuse, before it is built
    check_speed(train, ctx.device)  # ...and for a train.speed switch this machine cannot run
    load_deepspeed_ops()  # before deepspeed.initialize, which would wait forever on a killed loader's lock
    if not any(hasattr(p, "ds_id") for p in unet.parameters()):
        # A module built in deepspeed.zero.Init (module_init) already has its partitions where they belong.
        unet.to(ctx.device)
    unet.train()
    if train.deepspeed.activation_checkpointing:
        enable_activation_checkpointing(unet)
    apply_to_module(unet, train.speed)
    if set_tf32(train.speed, ctx.device):
        log.info("train.speed.tf32: fp32 matmuls and convolutions in TF32")
    params = [p for p in unet.parameters() if p.requires_grad]
    # train.speed.fused_adamw: by default fused on CUDA without offload (with offload the step runs on
    # CPU copies of the partitions).
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                                  fused=fused_adamw(train, ctx.device))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    config = single_rank_config(config, train, ctx.world_size)
    if load_universal:
        config = deepspeed_universal_config(config)
    engine, _, _, _ = deepspeed.initialize(model=unet, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    trim_single_rank(engine)  # a group of one rank: no all-reduce, a fused gradient norm
    apply_to_engine(engine, train)  # compile, and channels_last weights where DeepSpeed allows them
    engine.ldmflow_config = config  # what it was built with: the loop logs it with the run (deepspeed_config.json)
    return engine


def build_ema(module: torch.nn.Module, train: TrainConfig):
    if not train.ema.enabled:
        return None
    from diffusers.training_utils import EMAModel

    # fp32 shadows even when the engine trains in bf16: a 0.999 decay moves weights by less than
    # bf16's resolution, so a bf16 average would barely change. foreach: the update runs as
    # multi-tensor ops over all parameters instead of a loop of small ops per parameter (torch falls
    # back to per-tensor kernels for the fp32 - bf16 difference when the engine trains in bf16).
    return EMAModel([p.detach().float() for p in module.parameters()], decay=train.ema.decay,
                    use_ema_warmup=False, foreach=True)


GATHER_CHUNK_BYTES = 256 << 20
"""ZeRO-3 export gathers parameters in groups of about this many bytes (full size, all ranks)."""


def gather_unet_weights(engine, ctx: WorkerContext) -> dict[str, torch.Tensor] | None:
    """The engine's full UNet state dict, on CPU, in the module's own (training) dtype; every rank
    must call it (under ZeRO-3 it is a series of collectives), only rank 0 gets the dict.

    Stages 0-2 keep the full module on every rank, so rank 0 just copies it. ZeRO-3 partitions each
    parameter across ranks: they are all-gathered a group at a time (GATHER_CHUNK_BYTES), copied to
    CPU on rank 0 and released, so no rank ever holds more than one group beyond its partition."""
    module = engine.module
    if not engine.zero_optimization_partition_weights():
        if ctx.rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    import deepspeed

    keys = list(module.state_dict().keys())  # parameters are placeholders here, names are right
    params = list(module.named_parameters())
    weights: dict[str, torch.Tensor] = {}
    group: list[tuple[str, torch.nn.Parameter]] = []
    size = 0

    def gather(group) -> None:
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            if ctx.rank == 0:
                for name, p in group:
                    weights[name] = p.detach().to("cpu", copy=True)

    for name, p in params:
        group.append((name, p))
        size += getattr(p, "ds_numel", p.numel()) * p.element_size()
        if size >= GATHER_CHUNK_BYTES:
            gather(group)
            group, size = [], 0
    if group:
        gather(group)
    if ctx.rank != 0:
        return None
    # Buffers are not partitioned; keep only persistent ones (those in the state dict).
    for name, b in module.named_buffers():
        if name in keys and name not in weights:
            weights[name] = b.detach().to("cpu", copy=True)
    missing = [k for k in keys if k not in weights]
    if missing:
        raise RuntimeError(f"gathered UNet weights miss {missing[:3]}")
    return {k: weights[k] for k in keys}
