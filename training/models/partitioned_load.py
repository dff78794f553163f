"""Pretrained weights loaded into a model built inside deepspeed.zero.Init (train.deepspeed.zero_init).

diffusers' from_pretrained builds the whole model and then copies the checkpoint into it, which is
what zero.Init exists to avoid; inside zero.Init each parameter is already a partition across the
ranks. So the model is built empty from its config.json inside zero.Init, and the weights follow one
parameter at a time: every rank gathers the parameter, rank 0 reads its tensor from the safetensors
file (memory-mapped, one tensor at a time) into it, and DeepSpeed re-partitions it from rank 0's copy.
No rank ever holds more than one full parameter beyond its partitions. (transformers' ZeRO-3 loading
works the same way, a module at a time: `_load_state_dict_into_zero3_model`.)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from training.errors import ConfigError

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
"""What diffusers' save_pretrained writes (one file, or shards with an index), without a variant."""


def weight_files(folder: Path, key: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `folder` holding it; ConfigError naming `key` when the
    folder has no safetensors weights (only pickled .bin files are never loaded here)."""
    if (folder / WEIGHTS).is_file():
        from safetensors import safe_open

        with safe_open(folder / WEIGHTS, "pt") as f:
            return dict.fromkeys(f.keys(), folder / WEIGHTS)
    if (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
        return {name: folder / file for name, file in index.items()}
    raise ConfigError(f"config key `{key}`: {folder} has no {WEIGHTS} (or its sharded index), which "
                      "train.deepspeed.zero_init loads: save it as safetensors, or set train.deepspeed.zero_init=false")


def load_into_partitions(module: torch.nn.Module, files: dict[str, Path], key: str) -> None:
    """Copy the tensors of `files` (weight_files) into `module`'s ZeRO-3 partitioned parameters (and
    its buffers); every rank must call it (one gather per parameter). Upcast to the parameter's dtype."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    params = dict(module.named_parameters())
    buffers = {name: b for name, b in module.named_buffers() if name in module.state_dict()}
    missing = sorted((set(params) | set(buffers)) - set(files))
    unexpected = sorted(set(files) - set(params) - set(buffers))
    if missing or unexpected:
        raise ConfigError(f"config key `{key}`: the weights do not fit the model built from its config.json "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}): set train.deepspeed.zero_init=false "
                          "to load it through diffusers")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        opened: dict[Path, object] = {}

        def tensor(name: str) -> torch.Tensor:
            if files[name] not in opened:
                opened[files[name]] = stack.enter_context(safe_open(files[name], "pt"))
            return opened[files[name]].get_tensor(name)

        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank0:
                    with torch.no_grad():
                        param.copy_(tensor(name).to(param.dtype))
        for name, buffer in buffers.items():  # not partitioned: every rank reads its own
            with torch.no_grad():
                buffer.copy_(tensor(name).to(buffer.dtype))
