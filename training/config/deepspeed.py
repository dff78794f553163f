"""The `train.deepspeed` section, and the DeepSpeed config a run generates from `train`.

The generated config is a function of the run config alone (no DeepSpeed import), so a contradiction
between `train.deepspeed.extra` and what `train.*` says is refused when the config is read; what
only DeepSpeed (or this machine) can judge is checked by training.runtime.deepspeed_checks before
any training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from training.config.checks import check_key
from training.errors import ConfigError

if TYPE_CHECKING:
    from training.config.train import TrainConfig

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    offload_optimizer: str = "none"
    """Where ZeRO keeps the optimizer state (fp32 master weights, Adam moments) and runs the optimizer
    step: `none` (beside the model), `cpu` (ZeRO-Offload; stages 1-3) or `nvme` (ZeRO-Infinity: the
    state lives in files under nvme_path, streamed through CPU memory; stage 3)."""
    offload_param: str = "none"
    """Where ZeRO-3 keeps each rank's partition of the parameters between uses: `none`, `cpu` or `nvme`
    (under nvme_path). Stage 3 only: the other stages keep the full parameters on every rank."""
    nvme_path: str | None = None
    """A local, writable folder (ideally on a fast NVMe disk) for `nvme` offload; each rank's swap
    files go under it. Needs DeepSpeed's async_io op, built from libaio (`make install` installs it)."""
    pin_memory: bool = True
    """Offload into page-locked CPU memory: required for fast, overlapped GPU<->CPU copies; turn off on
    hosts with a tight `ulimit -l` or little RAM (pinned memory cannot be paged out)."""
    activation_checkpointing: bool = False
    """Recompute the trained model's activations in the backward pass instead of keeping them
    (diffusers' enable_gradient_checkpointing): about a third more compute for much less memory."""
    zero_init: bool = False
    """Stage 3: build the trained model inside deepspeed.zero.Init, so each parameter is partitioned
    as it is created and no rank ever holds the full model (a model larger than one rank's memory
    can start). The frozen VAE and text encoder are built outside it, whole on every rank."""
    extra: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed config keys merged (deep merge) over the generated config, for anything not above
    (e.g. zero_optimization.stage3_prefetch_bucket_size). Keys the generated config takes from
    train.* (batch sizes, ZeRO stage, offload devices, precision, clipping, the optimizer) may be
    repeated only with the same value; everything is validated by DeepSpeed's own config models
    before training."""

    def __post_init__(self) -> None:
        for key in ("offload_optimizer", "offload_param"):
            check_key(getattr(self, key) in OFFLOAD_DEVICES, f"train.deepspeed.{key}",
                      f"one of {', '.join(OFFLOAD_DEVICES)}", getattr(self, key))
        nvme = [k for k in ("offload_optimizer", "offload_param") if getattr(self, k) == "nvme"]
        if nvme and not self.nvme_path:
            raise ConfigError(f"config key `train.deepspeed.nvme_path` must name a local writable folder when "
                              f"train.deepspeed.{nvme[0]} is nvme: set it (e.g. train.deepspeed.nvme_path=/local_nvme)")
        if self.nvme_path is not None:
            check_key("://" not in self.nvme_path, "train.deepspeed.nvme_path", "a local folder (not a URI)",
                      self.nvme_path)

    def offloads(self) -> bool:
        return self.offload_optimizer != "none" or self.offload_param != "none"


def check_deepspeed_section(train: TrainConfig) -> None:
    """`train.deepspeed` against the rest of `train` (TrainConfig.__post_init__): what DeepSpeed would
    refuse or silently ignore for this ZeRO stage and precision, and `extra` against what train.* sets."""
    ds, stage = train.deepspeed, train.zero_stage
    if stage == 0 and ds.offloads():
        key = "offload_optimizer" if ds.offload_optimizer != "none" else "offload_param"
        raise ConfigError(f"config key `train.deepspeed.{key}` is {getattr(ds, key)} but train.zero_stage is 0 "
                          "(no ZeRO, nothing to offload): set train.zero_stage to 1-3, or the offload to none")
    if ds.offload_param != "none" and stage != 3:
        raise ConfigError(f"config key `train.deepspeed.offload_param` is {ds.offload_param} but train.zero_stage is "
                          f"{stage}: only ZeRO-3 partitions parameters; set train.zero_stage=3 or offload_param=none")
    if ds.offload_optimizer == "nvme" and stage != 3:
        # DeepSpeed's ZeRO-1/2 take `nvme` as plain CPU offload and never write to nvme_path.
        raise ConfigError(f"config key `train.deepspeed.offload_optimizer` is nvme but train.zero_stage is {stage}: "
                          "NVMe offload (ZeRO-Infinity) needs train.zero_stage=3; "
                          "use offload_optimizer=cpu at stages 1-2")
    if ds.zero_init and stage != 3:
        raise ConfigError(f"config key `train.deepspeed.zero_init` is true but train.zero_stage is {stage}: "
                          "deepspeed.zero.Init partitions parameters, which only ZeRO-3 does; set train.zero_stage=3")
    check_extra(train)


# --- the generated config ------------------------------------------------------------------------

def generated_config(train: TrainConfig) -> dict:
    """The DeepSpeed config of `train`: the generated keys, `train.deepspeed.extra` merged over them,
    then the keys train.* owns set again (extra may only repeat them; an elastic resume changes
    gradient_accumulation_steps after the config was read)."""
    ds = train.deepspeed
    zero: dict[str, Any] = {"stage": train.zero_stage}
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(ds, key)
        if device != "none":
            zero[key] = {"device": device, "pin_memory": ds.pin_memory}
            if device == "nvme":
                zero[key]["nvme_path"] = ds.nvme_path
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        # The optimizer is torch's AdamW, handed to DeepSpeed: it runs the same on CPU and GPU and
        # needs no JIT-compiled op. ZeRO partitions its state like any other optimizer's.
        "zero_allow_untested_optimizer": True,
        # With optimizer offload DeepSpeed refuses any optimizer but its own CPU Adam unless told
        # otherwise (runtime/engine.py, _configure_optimizer). ldmflow keeps torch AdamW there too:
        # the same update rule and state names (exp_avg, exp_avg_sq) as without offload, so an offloaded
        # run resumes into a plain one and back (universal checkpoints included), and no C++ op has to be
        # compiled on every node. The price is speed: DeepSpeed measures its vectorised CPU Adam several
        # times faster than torch's on CPU, which matters when the optimizer step, not the
        # forward/backward, bounds the step (very large models on few ranks).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    merged = deep_merge(config, ds.extra)
    for path in owned_settings(train):
        found, value = _get(config, path)
        if found:
            _set(merged, path, value)
    return merged


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- what train.* owns ---------------------------------------------------------------------------

_ABSENT = object()
"""An owned key the generated config leaves out (e.g. nvme_path without NVMe offload)."""


@dataclass(frozen=True)
class Owned:
    value: Any
    """What train.* makes it (_ABSENT: train.* leaves it out, and extra may not set it either)."""
    source: str
    """The ldmflow keys to set instead."""
    repeatable: bool = True
    """extra may repeat it with the same value (not the batch sizes: the engine derives them again for
    another worker count, when an extra copy would contradict them)."""


def owned_settings(train: TrainConfig) -> dict[tuple[str, ...], Owned]:
    """The DeepSpeed config keys that train.* decides, by path, with what it makes them."""
    ds = train.deepspeed
    batch = "train.batch_size, train.grad_accum and the worker count (see train.elastic_batch)"
    out: dict[tuple[str, ...], Owned] = {
        ("train_micro_batch_size_per_gpu",): Owned(train.batch_size, batch, repeatable=False),
        ("gradient_accumulation_steps",): Owned(train.grad_accum, batch, repeatable=False),
        ("train_batch_size",): Owned(_ABSENT, batch),
        ("gradient_clipping",): Owned(train.grad_clip, "train.grad_clip"),
        ("zero_optimization", "stage"): Owned(train.zero_stage, "train.zero_stage"),
        ("bf16", "enabled"): Owned(train.precision == "bf16", "train.precision"),
        ("fp16", "enabled"): Owned(train.precision == "fp16", "train.precision"),
        ("optimizer",): Owned(_ABSENT, "train.lr and train.weight_decay (ldmflow builds torch AdamW)"),
        ("scheduler",): Owned(_ABSENT, "train.warmup_steps and train.lr_schedule (ldmflow builds the LR schedule)"),
        ("zero_allow_untested_optimizer",): Owned(True, "ldmflow (torch AdamW is a client optimizer)"),
        ("zero_force_ds_cpu_optimizer",): Owned(False, "ldmflow (torch AdamW also with offload)"),
        ("checkpoint", "load_universal"): Owned(_ABSENT, "ldmflow (an elastic resume sets it)"),
    }
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(ds, key)
        out[("zero_optimization", key, "device")] = Owned(device, f"train.deepspeed.{key}")
        out[("zero_optimization", key, "nvme_path")] = Owned(ds.nvme_path if device == "nvme" else _ABSENT,
                                                             "train.deepspeed.nvme_path")
        out[("zero_optimization", key, "pin_memory")] = Owned(ds.pin_memory if device != "none" else _ABSENT,
                                                              "train.deepspeed.pin_memory")
    return out


def check_extra(train: TrainConfig) -> None:
    """`train.deepspeed.extra` against what train.* sets: a key train.* owns may be repeated with the
    same value, never contradicted (ConfigError naming the key to set instead)."""
    extra = train.deepspeed.extra
    for path in (("zero_optimization",), ("bf16",), ("fp16",), ("checkpoint",),
                 ("zero_optimization", "offload_optimizer"), ("zero_optimization", "offload_param")):
        found, value = _get(extra, path)
        if found and not isinstance(value, dict):
            raise ConfigError(f"config key `train.deepspeed.extra.{'.'.join(path)}` must be a mapping, got {value!r}")
    for path, owned in owned_settings(train).items():
        found, value = _get(extra, path)
        if not found:
            continue
        key = "train.deepspeed.extra." + ".".join(path)
        if owned.value is _ABSENT or not owned.repeatable:
            raise ConfigError(f"config key `{key}` is set by {owned.source}: remove it from train.deepspeed.extra")
        if value != owned.value:
            raise ConfigError(f"config key `{key}` is {value!r} but {owned.source} makes it {owned.value!r}: "
                              f"set {owned.source} instead, or remove it from train.deepspeed.extra")
    for section, flag in (("bf16", "bf16_master_weights_and_grads"), ("bf16", "bf16_optimizer_states"),
                          ("fp16", "fp16_master_weights_and_grads")):
        if _get(extra, (section, flag)) == (True, True):
            # DeepSpeed's _enforce_cpu_offload / _enforce_optimizer_offload (stage_1_and_2.py, stage3.py).
            raise ConfigError(f"config key `train.deepspeed.extra.{section}.{flag}` needs DeepSpeed's CPU Adam with "
                              "optimizer offload, but ldmflow's optimizer is torch AdamW: remove it")


def _get(data: dict, path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = data
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(data: dict, path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
