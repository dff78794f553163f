"""Reading a verified checkpoint's parts back, without unpickling code.

Safe loading. Nothing in a checkpoint is unpickled with ``weights_only=False``: JSON for positions
and state, ``torch.load(weights_only=True)`` for RNG states (tensors, ints, lists, dicts), safetensors
for EMA weights, and DeepSpeed's own files through :func:`safe_torch_load`, which allows only the
three plain-data DeepSpeed classes its ZeRO optimizer files contain (see ``_deepspeed_safe_globals``).
The sha256 lists catch corruption and partial uploads, not an attacker: whoever can rewrite a shard
can rewrite the lists too, which is why loading must be safe on its own.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from training.checkpoint.layout import (
    DEEPSPEED_DIR,
    EMA_FILE,
    UNET_FILE,
    CheckpointError,
    TrainState,
    loader_path,
    rng_path,
)


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))


def load_unet_weights(directory: Path, name: str = UNET_FILE) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / name), device="cpu")


def safe_torch_load(path: str | os.PathLike, map_location=None, **kwargs):
    """torch.load that unpickles only tensors, plain containers and numbers (plus DeepSpeed's
    plain-data classes); anything else is refused with a CheckpointError naming the file."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refused to load {path}: it holds more than tensors and plain data ({first})") from None


def _deepspeed_safe_globals() -> list:
    """The non-builtin classes in DeepSpeed 0.19's ZeRO optimizer files (checked with
    torch.serialization.get_unsafe_globals_in_checkpoint for ZeRO-2/3, fp32/bf16). All are plain
    data: an enum, a dataclass and loss-scaler objects that unpickle by setting attributes."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_positions(directory: Path, world_size: int) -> list[dict]:
    """Every rank's saved loader position (JSON): what a restore re-splits; no rank's RNG is read, so
    a rank that fetched only its own part (training.runtime.restore_point) has them all."""
    return [json.loads(loader_path(directory, rank).read_text()) for rank in range(world_size)]


def load_rank_files(directory: Path, rank: int) -> tuple[dict, dict]:
    loader = json.loads(loader_path(directory, rank).read_text())
    rng = safe_torch_load(rng_path(directory, rank), map_location="cpu")
    if not isinstance(rng, dict) or not {"generator", "torch", "numpy", "python"} <= set(rng):
        raise CheckpointError(f"{rng_path(directory, rank)} is not an RNG state dict (got {type(rng).__name__})")
    return loader, rng


def load_ema(directory: Path, ema, device: torch.device | str = "cpu") -> None:
    from safetensors import safe_open

    with safe_open(str(directory / EMA_FILE), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        state = json.loads(meta.get("ema", "{}"))
        state["shadow_params"] = [f.get_tensor(f"shadow_params.{i}") for i in range(int(meta.get("count", 0)))]
    ema.load_state_dict(state)


def load_deepspeed_checkpoint(engine, directory: Path, tag: str) -> None:
    """engine.load_checkpoint with DeepSpeed's torch.load (hard-coded weights_only=False in 0.19.8's
    TorchCheckpointEngine.load) replaced by safe_torch_load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"cannot load safely through DeepSpeed's {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    try:
        load_path, _ = engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=tag)
    finally:
        del engine.checkpoint_engine.load  # back to the class's method
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {directory / DEEPSPEED_DIR}/{tag}")


def consolidated_weights(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 UNet state dict from any ZeRO stage's partitions (DeepSpeed's zero_to_fp32), with
    that module's torch.load (hard-coded weights_only=False) made safe for the duration."""
    from deepspeed.utils import zero_to_fp32

    with torch_load_made_safe(zero_to_fp32):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory / DEEPSPEED_DIR), tag=tag)


def model_differences(saved: TrainState, model_config: dict) -> list[str]:
    """The `model.*` keys in which a checkpoint's model differs from `model_config` (a resolved
    ModelConfig as a dict): resuming across any of them would load tensors of the wrong shape or
    meaning."""
    theirs = saved.config.get("model", {})
    return sorted(f"model.{k}" for k in set(theirs) | set(model_config) if theirs.get(k) != model_config.get(k))


def stage0_weights(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full UNet state dict of a ZeRO stage-0 checkpoint (DeepSpeed's model file, training dtype):
    stage 0 writes no ZeRO optimizer shards for zero_to_fp32 to consolidate."""
    path = Path(directory) / DEEPSPEED_DIR / tag / "mp_rank_00_model_states.pt"
    state = safe_torch_load(path, map_location="cpu")
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(f"{path} holds no module state dict")
    return state["module"]


@contextmanager
def torch_load_made_safe(module) -> Iterator[None]:
    """Within `module` only, `torch.load` is safe_torch_load; every other torch attribute is torch's."""

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        load = staticmethod(safe_torch_load)

    original = module.torch
    module.torch = _Torch()
    try:
        yield
    finally:
        module.torch = original
