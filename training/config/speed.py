"""The `train.speed` section: throughput switches that change how fast a step runs, not what it trains.

Each is applied in the worker (training.runtime.speed) before the first step; what only the machine
or DeepSpeed can judge (a fused kernel for this device, compile under this ZeRO stage) is refused
there, before training, in one line. The defaults are what the trainer did before the section existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.config.checks import check_key
from training.errors import ConfigError

if TYPE_CHECKING:
    from training.config.train import TrainConfig

ATTENTION = ("sdpa", "math")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
FUSED_ADAMW = ("auto", True, False)


@dataclass(kw_only=True)
class SpeedConfig:
    attention: str = "sdpa"
    """Attention kernel of every attention layer of the trained UNet: `sdpa` (diffusers' AttnProcessor2_0,
    torch's scaled_dot_product_attention: flash / memory-efficient kernels on GPU, no (tokens x tokens)
    matrix kept for the backward) or `math` (diffusers' AttnProcessor: softmax(QK^T)V written out, the
    reference to compare against). diffusers picks sdpa by default, so `sdpa` is what ran before."""
    channels_last: bool = False
    """Keep the UNet's weights and its inputs in torch.channels_last (NHWC) memory: cuDNN's convolutions
    with tensor cores run without layout transposes. On CPU it is usually no faster (see the README)."""
    tf32: bool = False
    """On a CUDA GPU of compute capability >= 8 (Ampere and later), let fp32 matmuls and convolutions use
    TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32). Inert elsewhere (CPU,
    older GPUs), without an error. false leaves torch's defaults (fp32 matmuls; cuDNN convolutions may
    already use TF32). It matters for fp32 runs; bf16/fp16 matmuls do not go through it."""
    compile: bool = False
    """torch.compile the UNet through DeepSpeed's engine.compile() (after deepspeed.initialize: a module
    compiled before it breaks ZeRO-3's parameter hooks). The first step pays the compilation (minutes
    with inductor on CPU). Refused with ZeRO-3, where DeepSpeed's hooks break the graph at every layer
    (see training.runtime.speed)."""
    compile_backend: str = "inductor"
    """torch.compile backend with train.speed.compile: `inductor` (generated kernels: the fast one),
    `aot_eager` (traces forward and backward with AOTAutograd, runs them with eager kernels: checks that
    the model compiles, in seconds, without code generation) or `eager` (dynamo only)."""
    fused_adamw: bool | str = "auto"
    """torch AdamW's fused kernel (one kernel for the whole update instead of several ops per tensor
    group): `auto` uses it on CUDA without optimizer offload (what ran before); true uses it wherever
    torch has the kernel (CUDA, and CPU since torch 2.4: also the CPU copies of an offloaded optimizer);
    false never (foreach ops)."""

    def __post_init__(self) -> None:
        check_key(self.attention in ATTENTION, "train.speed.attention", f"one of {', '.join(ATTENTION)}",
                  self.attention)
        check_key(self.compile_backend in COMPILE_BACKENDS, "train.speed.compile_backend",
                  f"one of {', '.join(COMPILE_BACKENDS)}", self.compile_backend)
        # `is`: True == 1 would let an integer through the tuple test.
        check_key(any(self.fused_adamw is v or self.fused_adamw == v == "auto" for v in FUSED_ADAMW),
                  "train.speed.fused_adamw", "auto, true or false", self.fused_adamw)


ZERO3_COMPILE_ISSUE = "https://github.com/pytorch/pytorch/issues/115484"
"""torch.compile() breaks when using DeepSpeed ZeRO Level 3 sharding (open)."""


def check_speed_section(train: TrainConfig) -> None:
    """`train.speed` against the rest of `train` (TrainConfig.__post_init__): what cannot work whatever
    the machine."""
    speed = train.speed
    if speed.compile and train.zero_stage == 3:
        raise ConfigError(
            "config key `train.speed.compile` is true but train.zero_stage is 3: DeepSpeed's ZeRO-3 gathers and "
            "releases each layer's parameters in module hooks that torch.compile cannot trace, so the UNet "
            f"breaks into per-layer graphs that recompile until dynamo gives up ({ZERO3_COMPILE_ISSUE}); "
            "set train.speed.compile=false or train.zero_stage to 0-2")
