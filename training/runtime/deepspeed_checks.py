"""What only DeepSpeed, or this machine, can judge of a run's DeepSpeed config, checked before any
training: DeepSpeed's own config models over the merged config (train.deepspeed.extra included), the
precision this accelerator supports, and NVMe offload's folder and async I/O op. Each refusal is one
ConfigError line naming the key and the fix, instead of a trace from inside deepspeed.initialize.

The checks that need only the run config (offload against the ZeRO stage, extra against train.*) run
when the config is read: training.config.deepspeed.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from training.config import TrainConfig
from training.config.deepspeed import generated_config
from training.errors import ConfigError


def check_deepspeed(train: TrainConfig) -> dict:
    """The DeepSpeed config of `train`, validated; ConfigError (one line) for anything DeepSpeed or this
    machine would refuse. Every worker runs it before its engine is built (and its pre-flight runs
    check_nvme before anything): the precision and NVMe checks are about the worker's own node."""
    config = validated_config(train)
    _check_precision(train)
    check_nvme(train)
    return config


def validated_config(train: TrainConfig) -> dict:
    """The DeepSpeed config of `train` through DeepSpeed's own config models: what the driver checks
    before a run starts. Nothing about this machine: the driver's node (a CPU head of a GPU cluster)
    is not where the engines run."""
    config = generated_config(train)
    _check_with_deepspeed(config)
    return config


def _check_with_deepspeed(config: dict) -> None:
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    # zero_optimization through its pydantic model first: its errors name the field (`loc`).
    try:
        DeepSpeedZeroConfig(**config["zero_optimization"])
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in ("zero_optimization", *error["loc"]))
        raise ConfigError(f"config key `train.deepspeed.extra.{where}`: DeepSpeed refuses it "
                          f"({_one_line(error['msg'])}); fix or remove it") from None
    # Then the whole config as deepspeed.initialize reads it (its sections' models and sanity checks).
    try:
        DeepSpeedConfig(config)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"config key `train.deepspeed.extra`: DeepSpeed's {e.title} refuses "
                          f"{where or 'it'} ({_one_line(error['msg'])}); fix or remove that key") from None
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"config key `train.deepspeed.extra`: DeepSpeed refuses the merged config "
                          f"({_one_line(str(e)) or type(e).__name__}); fix or remove the key it names") from None


def _check_precision(train: TrainConfig) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if train.precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(f"config key `train.precision` is fp16, which DeepSpeed's {accelerator.device_name()} "
                          "accelerator here does not support: use bf16 or fp32")
    if train.precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(f"config key `train.precision` is bf16, which DeepSpeed's {accelerator.device_name()} "
                          "accelerator here does not support: use fp16 or fp32")


def check_nvme(train: TrainConfig) -> None:
    """With NVMe offload: nvme_path is a folder this process can create files in, and DeepSpeed's
    async_io op can be built here (it links libaio). On a cluster each node has its own disk, so
    every worker runs this again (training.runtime.preflight)."""
    ds = train.deepspeed
    nvme = [key for key in ("offload_optimizer", "offload_param") if getattr(ds, key) == "nvme"]
    if not nvme:
        return
    path = Path(ds.nvme_path)
    if not path.is_dir():
        raise ConfigError(f"config key `train.deepspeed.nvme_path` is {path}, which is not a folder"
                          f"{'' if path.exists() else ' (it does not exist)'}: create it or name a local writable one")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ldmflow-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"config key `train.deepspeed.nvme_path` is {path}, which is not writable here "
                          f"({e.strerror or e}): name a folder this user can write") from None
    if not async_io_available():
        raise ConfigError(f"config key `train.deepspeed.{nvme[0]}` is nvme, but DeepSpeed's async_io op cannot be "
                          "built here (it needs libaio: `make install` installs libaio-dev, or apt-get install "
                          "libaio-dev); install it or use cpu offload")


@functools.cache
def async_io_available() -> bool:
    """Whether DeepSpeed's async_io op (NVMe offload) can be built for this accelerator: DeepSpeed's own
    test, which compiles and links a call to libaio's io_submit."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    return builder is not None and bool(builder.is_compatible(verbose=False))


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:300] + "..." if len(text) > 300 else text

