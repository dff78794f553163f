"""Checkpoint layout, completeness and restore.

One checkpoint directory holds everything a resume needs, saved together and restored together::

    deepspeed/<tag>/...      DeepSpeed engine: UNet, optimizer, LR schedule (each rank its part)
    ema.pt                   EMA of the UNet (rank 0)
    loader/rank-<r>.json     each rank's stream position (epoch, samples consumed)
    rng/rank-<r>.pt          each rank's generators (noise, timesteps, caption dropout)
    train_state.json         step, samples seen, world size, resolved config, frozen-weight hashes
    COMMITTED                written last, after every rank has saved

DeepSpeed writes its ``latest`` file before all ranks finish, so readers trust only ``COMMITTED``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

COMMITTED = "COMMITTED"
DEEPSPEED_DIR = "deepspeed"
EMA_FILE = "ema.pt"
STATE_FILE = "train_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or does not belong to this run."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Samples consumed by all ranks together."""
    world_size: int = 1
    tag: str = ""
    """DeepSpeed tag of the engine state in deepspeed/."""
    config: dict = field(default_factory=dict)
    frozen: dict = field(default_factory=dict)
    """sha256 of the frozen VAE and text encoder weights this UNet was trained against."""


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def rng_state(generator: torch.Generator) -> dict:
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_rank_files(directory: Path, rank: int, *, loader: dict, rng: dict) -> None:
    (directory / "loader").mkdir(parents=True, exist_ok=True)
    (directory / "rng").mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "loader" / f"rank-{rank}.json", loader)
    torch.save(rng, directory / "rng" / f"rank-{rank}.pt")


def mark_committed(directory: Path, state: TrainState) -> None:
    write_json_atomic(directory / STATE_FILE, asdict(state))
    (directory / COMMITTED).write_text(f"step {state.step}\n")


def read_state(directory: str | Path) -> TrainState:
    """Load train_state.json of a checkpoint after checking every rank's part is there."""
    directory = Path(directory)
    if not (directory / COMMITTED).is_file():
        raise CheckpointError(f"checkpoint {directory} has no {COMMITTED} marker: it is incomplete")
    state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
    missing = [r for r in range(state.world_size) if not (directory / "loader" / f"rank-{r}.json").is_file()]
    if missing or not (directory / DEEPSPEED_DIR / state.tag).is_dir():
        raise CheckpointError(f"checkpoint {directory} lacks rank files {missing} or deepspeed/{state.tag}")
    return state


def load_rank_files(directory: Path, rank: int) -> tuple[dict, dict]:
    loader = json.loads((directory / "loader" / f"rank-{rank}.json").read_text())
    rng = torch.load(directory / "rng" / f"rank-{rank}.pt", weights_only=False)
    return loader, rng
