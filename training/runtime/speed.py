"""`train.speed` applied in the worker: attention kernel, memory format, TF32, fused AdamW, torch.compile.

build_engine (training.runtime.engine) calls these in order: check_speed before anything is built (one
line for what this machine cannot do), apply_to_module before deepspeed.initialize, fused_adamw for
the optimizer, then apply_to_engine after it (compile, and the weights' memory format where DeepSpeed
allows it). The inputs' memory format is the loss's business (ObjectiveOptions.channels_last).
"""

from __future__ import annotations

import logging
import shutil

import torch

from training.config import TrainConfig
from training.config.speed import SpeedConfig
from training.errors import ConfigError

log = logging.getLogger(__name__)


def check_speed(train: TrainConfig, device: torch.device) -> None:
    """What only this machine can judge, before anything is built: a fused AdamW kernel for the device
    the optimizer steps on, and a C++ compiler for inductor on CPU."""
    speed = train.speed
    if speed.fused_adamw is True:
        where = optimizer_device(train, device)
        try:
            torch.optim.AdamW([torch.zeros(1, device=where, requires_grad=True)], fused=True)
        except RuntimeError as e:
            raise ConfigError(f"config key `train.speed.fused_adamw` is true but torch {torch.__version__} has no "
                              f"fused AdamW for {where.type} ({str(e).splitlines()[0]}): set it to auto or false") \
                from None
    if speed.compile and speed.compile_backend == "inductor" and device.type == "cpu" \
            and shutil.which("g++") is None and shutil.which("c++") is None:
        raise ConfigError("config key `train.speed.compile` is true with compile_backend=inductor on CPU, which "
                          "generates C++, but this machine has no C++ compiler (g++/c++): install one, or set "
                          "train.speed.compile=false")


def optimizer_device(train: TrainConfig, device: torch.device) -> torch.device:
    """Where AdamW steps: beside the model, or on CPU copies of the partitions with optimizer offload."""
    return torch.device("cpu") if train.deepspeed.offload_optimizer != "none" else device


def fused_adamw(train: TrainConfig, device: torch.device) -> bool:
    """`auto`: fused on CUDA without optimizer offload (what the trainer always did: fused was taken to be
    a GPU kernel); true: fused wherever the optimizer steps (check_speed proved torch has the kernel)."""
    if train.speed.fused_adamw == "auto":
        return device.type == "cuda" and train.deepspeed.offload_optimizer == "none"
    return bool(train.speed.fused_adamw)


def set_tf32(speed: SpeedConfig, device: torch.device) -> bool:
    """TF32 matmuls and convolutions with train.speed.tf32 on a CUDA GPU of compute capability >= 8
    (tensor cores with TF32 start at Ampere); returns whether it is on. The flags are process-wide;
    elsewhere nothing changes (on CPU they would be inert anyway)."""
    if not speed.tf32 or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def attention_processor(speed: SpeedConfig):
    """A new diffusers attention processor of train.speed.attention (processors hold no weights)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor2_0() if speed.attention == "sdpa" else AttnProcessor()


def apply_to_module(module: torch.nn.Module, speed: SpeedConfig) -> int:
    """The attention kernel on every diffusers Attention layer of `module` (the UNet; the `vae` task's
    AutoencoderKL in its mid block); returns how many layers were set. Before deepspeed.initialize: the
    processor is plain Python state, which ZeRO-3's zero.Init placeholders do not affect."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in module.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_processor(attention_processor(speed))
    return len(layers)


def apply_to_engine(engine, train: TrainConfig) -> None:
    """After deepspeed.initialize: the weights' memory format and torch.compile.

    channels_last weights: DeepSpeed's initial broadcast views every parameter as bytes, which a
    channels_last tensor cannot be ("stride(-1) must be 1"), and ZeRO 1-3 and the bf16/fp16 optimizers
    keep the parameters as views of flat buffers that a new layout would detach from the optimizer. So
    the weights change layout only at ZeRO-0 in fp32, where the engine keeps the module's own tensors;
    elsewhere the inputs alone are channels_last, and torch picks the NHWC convolution from the input.

    compile: DeepSpeed's engine.compile(), i.e. nn.Module.compile() of the module in place: its state
    dict keys stay those of the plain module (a wrapped torch.compile(module) adds `_orig_mod.`, so
    checkpoints of compiled and plain runs would not load into each other), and a module compiled
    before deepspeed.initialize breaks ZeRO-3 (its hooks expect ZeRO's parameter dict). The first
    forward and backward pay the compilation."""
    speed = train.speed
    if speed.channels_last and weights_keep_layout(engine, train):
        for p in engine.module.parameters():
            if p.ndim == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    elif speed.channels_last:
        log.info("train.speed.channels_last: inputs only (ZeRO-%d %s keeps the weights in flat buffers)",
                 train.zero_stage, train.precision)
    if speed.compile:
        engine.compile(backend=speed.compile_backend)


def weights_keep_layout(engine, train: TrainConfig) -> bool:
    """Whether the engine trains the module's own parameter tensors (not views of a flat buffer)."""
    return engine.zero_optimization_stage() == 0 and train.precision == "fp32"


def is_channels_last(module: torch.nn.Module) -> bool:
    """Whether every 4-D weight of `module` is in channels_last layout."""
    weights = [p for p in module.parameters() if p.ndim == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
