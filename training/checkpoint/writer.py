"""Writing a checkpoint: each rank into its own local folder, its file list, and rank 0's COMMITTED
marker (see training.runtime.checkpoint_commit for when and where each is written).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data_prep import storage
from training.checkpoint.layout import (
    COMMITTED,
    EMA_FILE,
    FILES_DIR,
    FORMAT,
    STATE_FILE,
    UNET_FILE,
    CheckpointError,
    TrainState,
    file_list_path,
    loader_path,
    rng_path,
    sha256_file,
)


def write_json_atomic(path: Path, payload: dict) -> None:
    with storage.temporary_file(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, sort_keys=True))


def rng_state(generator: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": [int(x) for x in internal],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }


def save_rank_files(directory: Path, rank: int, *, loader: dict, rng: dict) -> None:
    loader_path(directory, rank).parent.mkdir(parents=True, exist_ok=True)
    rng_path(directory, rank).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(loader_path(directory, rank), loader)
    with storage.temporary_file(rng_path(directory, rank)) as tmp:
        torch.save(rng, tmp)


def save_ema(directory: Path, ema) -> None:
    """EMA (a diffusers EMAModel) as safetensors: shadow weights as tensors, scalars as JSON metadata."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {f"shadow_params.{i}": t.detach().cpu().contiguous() for i, t in enumerate(state["shadow_params"])}
    scalars = {k: v for k, v in state.items() if k != "shadow_params"}
    with storage.temporary_file(directory / EMA_FILE) as tmp:
        save_file(tensors, tmp, metadata={"ema": json.dumps(scalars), "count": str(len(tensors))})


def save_unet_weights(directory: Path, weights: dict[str, torch.Tensor], *, step: int, name: str = UNET_FILE) -> None:
    """The gathered state dict of the trained module (rank 0, final checkpoint) as safetensors,
    written atomically; `name` is the task's weights file (UNET_FILE or VAE_FILE)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    with storage.temporary_file(directory / name) as tmp:
        save_file(tensors, tmp, metadata={"step": str(step), "format": f"ldmflow-{name.split('.')[0]}"})


def write_file_list(directory: Path, rank: int) -> str:
    """List every file in this rank's local checkpoint folder (all of it is this rank's part) with
    size and sha256 into files/rank-<rank>.json; returns the list file's sha256 for the marker."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if not path.is_file() or rel.split("/")[0] in (FILES_DIR, COMMITTED, STATE_FILE) or path.name.startswith("."):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    target = file_list_path(directory, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, {"rank": rank, "files": files})
    return sha256_file(target)


def mark_committed(directory: Path, state: TrainState, file_lists: list[str]) -> None:
    """Rank 0, after every rank wrote and listed its files: `file_lists[r]` is rank r's list digest."""
    write_json_atomic(directory / STATE_FILE, asdict(state))
    write_json_atomic(directory / COMMITTED, committed_marker(state, (directory / STATE_FILE).read_bytes(), file_lists))


def committed_marker(state: TrainState, state_json: bytes, file_lists: list[str] | list[bytes]) -> dict:
    """The COMMITTED marker for `state` stored as `state_json`, whose rank r's file list is
    `file_lists[r]`: its sha256, or its bytes (hashed here)."""
    if len(file_lists) != state.world_size:
        raise CheckpointError(f"{len(file_lists)} rank file lists for a world of {state.world_size}")
    digests = [hashlib.sha256(x).hexdigest() if isinstance(x, bytes) else x for x in file_lists]
    return {
        "format": FORMAT,
        "step": state.step,
        "tag": state.tag,
        "world_size": state.world_size,
        "train_state_sha256": hashlib.sha256(state_json).hexdigest(),
        "file_lists": {f"{FILES_DIR}/rank-{r}.json": digest for r, digest in enumerate(digests)},
    }
