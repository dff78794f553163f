"""train.speed: each switch applied to a real engine (the worker's own build_engine on one rank over a
gloo group of 1, the process_group fixture, without Ray) and trained for a few steps; what cannot run
refused before training in one line; the loss kept on its device between log steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.config import ConfigError, load_config
from training.runtime.metrics import LossWindow

ROOT = Path(__file__).resolve().parents[3]
MODEL = ["model.unet.block_out_channels=[32,64]", "model.unet.down_block_types=[CrossAttnDownBlock2D,DownBlock2D]",
         "model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D]"]
"""A 0.8M-parameter UNet with the tiny preset's block kinds (as test_deepspeed_options.py)."""
CPU = torch.device("cpu")


def config(*overrides: str):
    return load_config(ROOT / "configs/tiny.yaml", [*MODEL, "train.batch_size=2", "train.warmup_steps=0",
                                                    "train.lr=1e-3", "train.ema.enabled=false", *overrides])


def engine_of(cfg):
    from training.models.assembly import build_components
    from training.runtime.context import WorkerContext
    from training.runtime.engine import build_engine

    parts = build_components(cfg.model, seed=cfg.train.seed)
    return build_engine(parts.unet, cfg.train, WorkerContext(rank=0, world_size=1, device=CPU)), parts


def train_steps(engine, parts, cfg, n: int) -> list[float]:
    """`n` optimizer steps on one fixed batch through the loss the worker uses (with the run's options):
    the loss of the same inputs, which training must bring down."""
    from training.tasks.diffusion_loss import ObjectiveOptions, diffusion_loss

    g = torch.Generator().manual_seed(0)
    size = parts.unet.config.sample_size
    latents = torch.randn(2, 4, size, size, generator=g)
    noise = torch.randn(2, 4, size, size, generator=g)
    with torch.no_grad():
        text = parts.text.encode(["a red circle on a blue background", "a yellow square"], CPU)
    options = ObjectiveOptions.from_train(cfg.train)
    losses = []
    for _ in range(n):
        loss = diffusion_loss(engine, parts.noise_scheduler, latents, text, g, timesteps=torch.tensor([300, 700]),
                              noise=noise, options=options)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def falls(losses: list[float]) -> bool:
    return all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


# --- the config alone ------------------------------------------------------------------------------


def test_defaults_are_what_ran_before_and_the_section_is_not_hashed():
    from training.runtime.speed import fused_adamw

    plain = config()
    speed = plain.train.speed
    assert (speed.attention, speed.channels_last, speed.tf32, speed.compile, speed.fused_adamw) == \
        ("sdpa", False, False, False, "auto")
    # auto: fused on CUDA without optimizer offload, as build_engine always did.
    assert not fused_adamw(plain.train, CPU) and fused_adamw(plain.train, torch.device("cuda"))
    offload = config("train.deepspeed.offload_optimizer=cpu").train
    assert not fused_adamw(offload, torch.device("cuda"))
    # Speed, not results: a run's identity (caching, lineage) does not change with it; the params do log it.
    fast = config("train.speed.attention=math", "train.speed.channels_last=true", "train.speed.tf32=true",
                  "train.speed.compile=true", "train.speed.fused_adamw=true")
    assert fast.hash == plain.hash and fast.flat()["train.speed.fused_adamw"] is True


@pytest.mark.parametrize(("override", "key", "says"), [
    ("train.speed.attention=flash", "train.speed.attention", "one of sdpa, math"),
    ("train.speed.fused_adamw=sometimes", "train.speed.fused_adamw", "auto, true or false"),
    ("train.speed.compile_backend=tvm", "train.speed.compile_backend", "one of inductor, aot_eager, eager"),
    ("train.speed.channels_last=1", "train.speed.channels_last", "true or false"),
])
def test_bad_values_are_one_line_naming_the_key(override, key, says):
    with pytest.raises(ConfigError) as refused:
        config(override)
    message = str(refused.value)
    assert "\n" not in message and f"`{key}`" in message and says in message, message


def test_compile_with_zero3_is_refused_naming_the_upstream_issue():
    with pytest.raises(ConfigError) as refused:
        config("train.zero_stage=3", "train.speed.compile=true")
    message = str(refused.value)
    assert "\n" not in message and "`train.speed.compile`" in message, message
    assert "github.com/pytorch/pytorch/issues/115484" in message and "train.zero_stage to 0-2" in message


def test_tf32_is_inert_on_cpu():
    from training.runtime.speed import set_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert set_tf32(config("train.speed.tf32=true").train.speed, CPU) is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# --- real engines -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("attention", "processor"), [("math", "AttnProcessor"), ("sdpa", "AttnProcessor2_0")])
def test_attention_kernel_is_set_on_every_attention_layer_and_trains(process_group, attention, processor):
    from diffusers.models.attention_processor import Attention

    cfg = config(f"train.speed.attention={attention}")
    engine, parts = engine_of(cfg)
    layers = [m for m in engine.module.modules() if isinstance(m, Attention)]
    assert len(layers) >= 4  # self- and cross-attention of both attention levels
    assert {type(m.processor).__name__ for m in layers} == {processor}
    assert falls(train_steps(engine, parts, cfg, 3))


def test_math_and_sdpa_attention_compute_the_same_loss(process_group):
    """A speed switch: the two kernels give the same forward up to rounding."""
    from training.runtime.speed import apply_to_module
    from training.tasks.diffusion_loss import diffusion_loss

    cfg = config()
    _, parts = engine_of(cfg)  # only to build the parts the same way
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 32, parts.text.hidden_size, generator=g)
    losses = {}
    for attention in ("sdpa", "math"):
        apply_to_module(parts.unet, config(f"train.speed.attention={attention}").train.speed)
        with torch.no_grad():
            losses[attention] = float(diffusion_loss(parts.unet, parts.noise_scheduler, latents, text,
                                                     torch.Generator().manual_seed(2)))
    assert losses["sdpa"] == pytest.approx(losses["math"], rel=1e-5), losses


def test_channels_last_weights_at_zero0_and_inputs_everywhere(process_group):
    from training.runtime.speed import is_channels_last

    seen: list[bool] = []
    for stage in (0, 2):
        cfg = config(f"train.zero_stage={stage}", "train.speed.channels_last=true")
        engine, parts = engine_of(cfg)
        # ZeRO-0 fp32 trains the module's own tensors: the weights change layout. ZeRO-1/2 keep them as
        # views of a flat buffer, and DeepSpeed's broadcast cannot take a channels_last tensor: unchanged.
        assert is_channels_last(engine.module) is (stage == 0)
        hook = engine.module.conv_in.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        losses = train_steps(engine, parts, cfg, 3)
        hook.remove()
        assert falls(losses), (stage, losses)
        assert is_channels_last(engine.module) is (stage == 0)  # and still so after optimizer steps
    assert seen == [True] * 6  # every step's input, at both stages


def test_fused_adamw_true_runs_torchs_fused_kernel_on_cpu(process_group):
    """torch has a fused AdamW for CPU tensors since 2.4 (several times faster than foreach here, see
    bench/speed_habits.py), so `true` is honoured on CPU, also on the CPU copies of an offloaded optimizer."""
    for overrides in ((), ("train.deepspeed.offload_optimizer=cpu",)):
        cfg = config("train.speed.fused_adamw=true", *overrides)
        engine, parts = engine_of(cfg)
        inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        assert type(inner) is torch.optim.AdamW and inner.param_groups[0]["fused"] is True
        assert falls(train_steps(engine, parts, cfg, 3)), overrides
    cfg = config("train.speed.fused_adamw=false")
    engine, _ = engine_of(cfg)
    assert engine.optimizer.optimizer.param_groups[0]["fused"] is False


def test_compile_runs_the_compiled_unet_through_deepspeed(process_group):
    """engine.compile() with aot_eager (dynamo + AOTAutograd, no code generation: seconds, not the minutes
    inductor takes on CPU; test_compile_with_inductor_trains runs the real backend): the engine's module
    is the compiled one, its state dict keys are the plain module's, and it trains."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = config("train.speed.compile=true", "train.speed.compile_backend=aot_eager")
    engine, parts = engine_of(cfg)
    assert engine.is_compiled and engine.module._compiled_call_impl is not None
    assert not any(k.startswith("_orig_mod.") for k in engine.module.state_dict())
    losses = train_steps(engine, parts, cfg, 3)
    assert falls(losses), losses
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo did capture the UNet
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_with_inductor_trains(process_group):
    """The real backend: minutes on 2 CPU cores when its cache is cold (inductor generates and builds C++
    for the forward and backward graphs), hence slow."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg = config("train.speed.compile=true")
    engine, parts = engine_of(cfg)
    losses = train_steps(engine, parts, cfg, 3)
    assert engine.is_compiled and falls(losses), losses
    torch._dynamo.reset()


# --- the loss stays on its device ----------------------------------------------------------------------


class Watched(torch.Tensor):
    """A tensor that records every read-back to the host (what would wait for the GPU's queue)."""

    reads: list[str] = []
    READS = {"item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu", "__format__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls.READS:
            cls.reads.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_loss_window_sums_on_the_device_without_reading_back():
    Watched.reads = []
    window = LossWindow()
    values = [0.5, 0.25, 0.125, 2.0]
    for v in values:
        loss = torch.tensor(v, requires_grad=True).as_subclass(Watched) * 1.0  # a loss with a graph
        window.add(loss, 2)
        window.end_step(0.1)
    assert Watched.reads == [], Watched.reads  # no micro-batch read its loss back
    total = window.loss_sum
    assert isinstance(total, torch.Tensor) and total.device.type == "cpu" and total.dtype == torch.float64
    assert not total.requires_grad  # detached: the window keeps no step's graph alive
    assert float(total) == pytest.approx(sum(values)) and window.count == 4 and window.samples == 8
