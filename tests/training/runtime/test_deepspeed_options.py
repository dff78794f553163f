"""train.deepspeed: the DeepSpeed config a run generates (extra merged over it), every combination
DeepSpeed or this machine would refuse refused first in one line naming the key, and real engines
built with the options: ZeRO-3 with CPU optimizer and parameter offload, zero.Init and activation
checkpointing, and NVMe offload (ZeRO-Infinity) where DeepSpeed's async_io op can be built.

The engines are the worker's own (training.runtime.engine.build_engine, module_init) on one rank over
a gloo group of 1 (the process_group fixture), without Ray."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.checkpoint.elastic import deepspeed_universal_config
from training.config import ConfigError, config_from_dict, load_config
from training.config.deepspeed import generated_config

ROOT = Path(__file__).resolve().parents[3]
ZERO3 = ["train.zero_stage=3", "train.ema.enabled=false"]
MODEL = ["model.unet.block_out_channels=[32,64]", "model.unet.down_block_types=[CrossAttnDownBlock2D,DownBlock2D]",
         "model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D]"]
"""A 0.8M-parameter UNet with the tiny preset's block kinds (as tests/training/checkpoint/test_elastic_resume.py)."""


def config(*overrides: str):
    return load_config(ROOT / "configs/tiny.yaml", list(overrides))


# --- the config alone ------------------------------------------------------------------------------

REFUSED = [
    # (overrides, the key the line must name, what it must say)
    (["train.deepspeed.offload_param=cpu"], "train.deepspeed.offload_param", "train.zero_stage=3"),
    (["train.zero_stage=0", "train.deepspeed.offload_optimizer=cpu"], "train.deepspeed.offload_optimizer",
     "train.zero_stage to 1-3"),
    (["train.zero_stage=1", "train.deepspeed.offload_optimizer=nvme", "train.deepspeed.nvme_path=/tmp"],
     "train.deepspeed.offload_optimizer", "train.zero_stage=3"),
    ([*ZERO3, "train.deepspeed.offload_param=nvme"], "train.deepspeed.nvme_path", "set it"),
    ([*ZERO3, "train.deepspeed.offload_param=disk"], "train.deepspeed.offload_param", "one of none, cpu, nvme"),
    (["train.deepspeed.zero_init=true"], "train.deepspeed.zero_init", "train.zero_stage=3"),
    (["train.deepspeed.extra.zero_optimization.stage=3"], "train.deepspeed.extra.zero_optimization.stage",
     "set train.zero_stage instead"),
    (["train.deepspeed.extra.train_micro_batch_size_per_gpu=8"], "train.deepspeed.extra.train_micro_batch_size_per_gpu",
     "train.batch_size"),
    (["train.deepspeed.extra.train_batch_size=64"], "train.deepspeed.extra.train_batch_size", "train.batch_size"),
    (["train.deepspeed.extra.bf16.enabled=true"], "train.deepspeed.extra.bf16.enabled", "train.precision"),
    (["train.deepspeed.extra.optimizer.type=Adam"], "train.deepspeed.extra.optimizer", "train.lr"),
    ([*ZERO3, "train.deepspeed.offload_optimizer=cpu",
      "train.deepspeed.extra.zero_optimization.offload_optimizer.device=nvme"],
     "train.deepspeed.extra.zero_optimization.offload_optimizer.device", "train.deepspeed.offload_optimizer"),
    (["train.deepspeed.extra.zero_force_ds_cpu_optimizer=true"], "train.deepspeed.extra.zero_force_ds_cpu_optimizer",
     "torch AdamW"),
    (["train.deepspeed.extra.zero_optimization=3"], "train.deepspeed.extra.zero_optimization", "mapping"),
    (["train.precision=bf16", "train.allow_cpu_half_precision=true",
      "train.deepspeed.extra.bf16.bf16_master_weights_and_grads=true"],
     "train.deepspeed.extra.bf16.bf16_master_weights_and_grads", "CPU Adam"),
]


@pytest.mark.parametrize(("overrides", "key", "says"), REFUSED, ids=[r[1].rsplit(".", 1)[-1] + f"-{i}"
                                                                      for i, r in enumerate(REFUSED)])
def test_each_bad_combination_is_one_line_naming_the_key(overrides, key, says):
    with pytest.raises(ConfigError) as refused:
        config(*overrides)
    message = str(refused.value)
    assert "\n" not in message and f"`{key}`" in message and says in message, message


def test_extra_is_deep_merged_and_the_keys_train_owns_stay_its_own():
    cfg = config(*ZERO3, "train.deepspeed.offload_optimizer=cpu", "train.deepspeed.pin_memory=false",
                 "train.deepspeed.extra.zero_optimization.stage3_prefetch_bucket_size=123456",
                 "train.deepspeed.extra.zero_optimization.offload_optimizer.buffer_count=6",
                 "train.deepspeed.extra.zero_optimization.stage=3",  # repeating train.zero_stage is fine
                 "train.deepspeed.extra.fp16.initial_scale_power=12",
                 "train.deepspeed.extra.wall_clock_breakdown=true")
    ds = generated_config(cfg.train)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_prefetch_bucket_size"] == 123456
    # Merged key by key into the generated section, not replacing it.
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False, "buffer_count": 6}
    assert "offload_param" not in zero
    assert ds["fp16"] == {"enabled": False, "initial_scale_power": 12} and ds["wall_clock_breakdown"] is True
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW with offload (see generated_config)
    # What an elastic resume builds: another accumulation, and the universal flag over everything else.
    elastic = deepspeed_universal_config(generated_config(replace(cfg.train, grad_accum=4)))
    assert elastic["gradient_accumulation_steps"] == 4 and elastic["checkpoint"] == {"load_universal": True}
    assert elastic["zero_optimization"] == zero
    # The section survives the trip through a checkpoint's saved config and the run's params.
    assert config_from_dict(cfg.to_dict()).train.deepspeed == cfg.train.deepspeed
    flat = cfg.flat()
    assert flat["train.deepspeed.extra.zero_optimization.stage3_prefetch_bucket_size"] == 123456
    assert flat["train.deepspeed.offload_optimizer"] == "cpu"


def test_memory_options_keep_the_config_hash_and_extra_changes_it():
    """Offload, zero.Init and activation checkpointing change where DeepSpeed keeps things, not what is
    trained: a run's config hash (caching, lineage) stays; an extra key may change training: it does not."""
    plain = config(*ZERO3)
    memory = config(*ZERO3, "train.deepspeed.offload_optimizer=cpu", "train.deepspeed.offload_param=cpu",
                    "train.deepspeed.zero_init=true", "train.deepspeed.activation_checkpointing=true",
                    "train.deepspeed.pin_memory=false")
    tuned = config(*ZERO3, "train.deepspeed.extra.zero_optimization.stage3_prefetch_bucket_size=1000")
    assert memory.hash == plain.hash and tuned.hash != plain.hash


def test_nothing_set_generates_the_config_of_before():
    """A config without train.deepspeed builds the same engine as before the section existed (plus
    the flag that only matters with offload)."""
    ds = generated_config(config().train)
    assert ds["zero_optimization"] == {"stage": 2}
    assert set(ds) == {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                       "zero_optimization", "bf16", "fp16", "zero_allow_untested_optimizer",
                       "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown"}


# --- what DeepSpeed and this machine judge (DeepSpeed imported, no engine) --------------------------

DEEPSPEED_REFUSES = [
    (["train.deepspeed.extra.zero_optimization.no_such_knob=1"], "train.deepspeed.extra.zero_optimization.no_such_knob",
     "Extra inputs are not permitted"),
    (["train.deepspeed.extra.zero_optimization.reduce_bucket_size=-1"],
     "train.deepspeed.extra.zero_optimization.reduce_bucket_size", "greater than 0"),
    (["train.deepspeed.offload_optimizer=cpu", "train.deepspeed.extra.zero_optimization.offload_optimizer.ratio=0.5"],
     "train.deepspeed.extra.zero_optimization", "Partial offloading only supported for ZeRO Stage 3"),
    (["train.deepspeed.extra.fp16.loss_scale=abc"], "train.deepspeed.extra", "loss_scale"),
]


@pytest.mark.parametrize(("overrides", "key", "says"), DEEPSPEED_REFUSES,
                         ids=["unknown-key", "negative-bucket", "partial-offload-stage2", "fp16-section"])
def test_what_deepspeeds_own_config_models_refuse_is_one_line(overrides, key, says):
    from training.runtime.deepspeed_checks import check_deepspeed

    train = config(*overrides).train  # the config itself reads fine
    with pytest.raises(ConfigError) as refused:
        check_deepspeed(train)
    message = str(refused.value)
    assert "\n" not in message and f"`{key}`" in message and says in message, message


def test_nvme_path_must_be_a_writable_folder(tmp_path):
    from training.runtime.deepspeed_checks import check_nvme

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    # /proc: no one, root included, can create a file there.
    for path, says in ((tmp_path / "missing", "does not exist"), (not_a_folder, "not a folder"),
                       (Path("/proc"), "not writable")):
        train = config(*ZERO3, "train.deepspeed.offload_param=nvme", f"train.deepspeed.nvme_path={path}").train
        with pytest.raises(ConfigError) as refused:
            check_nvme(train)
        message = str(refused.value)
        assert "\n" not in message and "`train.deepspeed.nvme_path`" in message and says in message, message
        assert str(path) in message


def _async_io() -> bool:
    from training.runtime.deepspeed_checks import async_io_available

    return async_io_available()


def test_nvme_offload_without_the_async_io_op_is_refused(tmp_path):
    if _async_io():
        pytest.skip("DeepSpeed's async_io op builds here (libaio present): test_nvme_offload_trains runs instead")
    from training.runtime.deepspeed_checks import check_nvme

    train = config(*ZERO3, "train.deepspeed.offload_param=nvme", f"train.deepspeed.nvme_path={tmp_path}").train
    with pytest.raises(ConfigError, match=r"`train.deepspeed.offload_param` is nvme, but DeepSpeed's async_io op "
                                          r"cannot be built here \(it needs libaio"):
        check_nvme(train)


# --- real engines ------------------------------------------------------------------------------------


def _steps(engine, parts, n: int) -> list[float]:
    """`n` optimizer steps on one fixed batch (latents, text, timesteps and noise all fixed): the loss
    of the same inputs, which training must bring down."""
    from training.tasks.diffusion_loss import diffusion_loss

    g = torch.Generator().manual_seed(0)
    size = parts.unet.config.sample_size
    latents = torch.randn(2, 4, size, size, generator=g)
    noise = torch.randn(2, 4, size, size, generator=g)
    timesteps = torch.tensor([300, 700])
    with torch.no_grad():
        text = parts.text.encode(["a red circle on a blue background", "a yellow square"], torch.device("cpu"))
    losses = []
    for _ in range(n):
        loss = diffusion_loss(engine, parts.noise_scheduler, latents, text, g, timesteps=timesteps, noise=noise)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_zero3_offload_zero_init_and_activation_checkpointing_train(process_group):
    import deepspeed

    from training.models.assembly import build_components, build_unet
    from training.runtime.context import WorkerContext
    from training.runtime.engine import build_engine, module_init

    cfg = config(*MODEL, *ZERO3, "train.batch_size=2", "train.warmup_steps=0", "train.lr=1e-3",
                 "train.deepspeed.offload_optimizer=cpu", "train.deepspeed.offload_param=cpu",
                 "train.deepspeed.zero_init=true", "train.deepspeed.activation_checkpointing=true")
    started = time.monotonic()
    parts = build_components(cfg.model, seed=cfg.train.seed, unet_init=module_init(cfg.train))

    # zero.Init: every UNet parameter was partitioned as it was created (a placeholder of 0 elements
    # stands where the full tensor would be); the frozen VAE and text encoder were built outside it.
    unet_params = list(parts.unet.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for p in unet_params)
    assert sum(p.ds_numel for p in unet_params) > 500_000
    for frozen in (parts.vae, parts.text.model):
        assert all(not hasattr(p, "ds_id") and p.numel() > 0 for p in frozen.parameters())
    # ...and it is the same UNet as one built whole from the same seed.
    whole = build_unet(cfg.model.unet, sample_size=parts.unet.config.sample_size, in_channels=4,
                       cross_attention_dim=parts.text.hidden_size, seed=cfg.train.seed)
    with deepspeed.zero.GatheredParameters(unet_params):
        differ = [n for (n, p), (_, w) in zip(parts.unet.named_parameters(), whole.named_parameters())
                  if not torch.equal(p, w)]
    assert not differ, differ[:3]

    # A pre-hook: torch's non-reentrant recomputation stops once it has what the backward needs, so a
    # recomputed block starts its forward again but may never finish it (no forward hook).
    started_forward = []
    parts.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: started_forward.append(1))
    engine = build_engine(parts.unet, cfg.train, WorkerContext(rank=0, world_size=1, device=torch.device("cpu")))
    losses = _steps(engine, parts, 3)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses

    # Activation checkpointing: each step ran the block twice, the second time in the backward pass to
    # recompute what the forward did not keep.
    assert engine.module.is_gradient_checkpointing and len(started_forward) == 2 * 3
    # Offload as DeepSpeed built it: the ZeRO-3 optimizer keeps fp32 partitions and torch AdamW's state in
    # CPU memory and the parameter partitions there too; the optimizer is torch's AdamW, not DeepSpeed's.
    zero = engine.optimizer
    assert engine.zero_optimization_stage() == 3 and zero.offload_optimizer and zero.offload_param
    assert type(zero.optimizer) is torch.optim.AdamW
    flat = zero.fp32_partitioned_groups_flat
    state = [zero.optimizer.state[p] for p in flat]
    assert all(s["exp_avg"].device.type == "cpu" and s["exp_avg"].shape == p.shape for s, p in zip(state, flat))
    assert all(p.ds_tensor.device.type == "cpu" for p in unet_params)
    assert engine.ldmflow_config["zero_optimization"]["offload_param"]["device"] == "cpu"
    print(f"zero-3 offload engine: {time.monotonic() - started:.1f} s, losses {losses}")


@pytest.mark.slow
def test_nvme_offload_trains(process_group, tmp_path):
    if not _async_io():
        pytest.skip("DeepSpeed's async_io op cannot be built here (no libaio): the refusal test runs instead")
    from training.models.assembly import build_components
    from training.runtime.context import WorkerContext
    from training.runtime.engine import build_engine, module_init

    nvme = tmp_path / "nvme"
    nvme.mkdir()
    # The optimizer state on NVMe (ZeRO-Infinity), the parameters in CPU memory. Parameters on NVMe are
    # not tested: DeepSpeed 0.19.8 swaps only partitions of >= 1 MiB (swap_tensor/utils.py MIN_AIO_BYTES),
    # and with such a UNet (5M parameters) its parameter swapper failed here within the first step
    # ("param ... already assigned swap buffer id", partitioned_param_swapper.py).
    cfg = config(*MODEL, *ZERO3, "train.batch_size=2", "train.warmup_steps=0", "train.lr=1e-3",
                 "train.deepspeed.offload_optimizer=nvme", "train.deepspeed.offload_param=cpu",
                 f"train.deepspeed.nvme_path={nvme}", "train.deepspeed.zero_init=true")
    started = time.monotonic()
    parts = build_components(cfg.model, seed=cfg.train.seed, unet_init=module_init(cfg.train))
    engine = build_engine(parts.unet, cfg.train, WorkerContext(rank=0, world_size=1, device=torch.device("cpu")))
    losses = _steps(engine, parts, 2)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    zero = engine.optimizer
    assert zero.offload_optimizer and zero.optimizer_swapper is not None
    # The fp32 partition and Adam's moments live in files under nvme_path, written by the async I/O op.
    swapped = {f.name for f in (nvme / "zero_stage_3" / "optimizer" / "rank0").glob("*.swp") if f.stat().st_size > 0}
    assert {name.split("-")[0] for name in swapped} >= {"exp_avg", "exp_avg_sq"} and len(swapped) >= 3, swapped
    print(f"nvme offload engine: {time.monotonic() - started:.1f} s, losses {losses}")
