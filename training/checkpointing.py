"""Checkpoint layout, completeness and restore.

One checkpoint directory holds everything a resume needs, saved together and restored together::

    deepspeed/<tag>/...      DeepSpeed engine: UNet, optimizer, LR schedule (each rank its part)
    ema.safetensors          EMA of the UNet (rank 0), scalars in the safetensors metadata
    unet.safetensors         final checkpoint only: the full UNet state dict in the engine's training
                             dtype, gathered by every rank (a collective under ZeRO-3), written by rank 0
    loader/rank-<r>.json     each rank's stream position (epoch, samples consumed)
    rng/rank-<r>.pt          each rank's generators, as tensors and plain numbers only
    files/rank-<r>.json      every file rank r wrote above, with its size and sha256
    train_state.json         step, samples seen, world size, resolved config, frozen-weight hashes
    COMMITTED                JSON: step, tag, world size, sha256 of train_state.json and of every
                             rank's file list; written by rank 0 after every rank listed its files

Completeness. Each rank saves into its own local folder and reports it with
``ray.train.report(checkpoint=...)``; Ray (2.60, synchronous upload) copies every rank's folder into
the same storage directory independently, and registers the checkpoint once all ranks reported. So
in storage, rank 0's ``COMMITTED`` can land before rank 1's shards, and a run killed mid-upload
leaves a directory with a marker but not every file. The writer-side barrier (every rank has written
and listed its files before rank 0 writes the marker) only makes the marker *truthful*; the real
guarantee is the reader's: :func:`read_state` trusts a checkpoint only when ``COMMITTED`` is there,
``train_state.json`` and every rank's file list match the digests it names, and every listed file
is present with its listed size (and sha256, with ``verify_hashes=True``, which resume uses).
DeepSpeed writes its ``latest`` file before all ranks finish, so nothing here reads it.

Safe loading. Nothing in a checkpoint is unpickled with ``weights_only=False``: JSON for positions
and state, ``torch.load(weights_only=True)`` for RNG states (tensors, ints, lists, dicts), safetensors
for EMA weights, and DeepSpeed's own files through :func:`safe_torch_load`, which allows only the
three plain-data DeepSpeed classes its ZeRO optimizer files contain (see ``_deepspeed_safe_globals``).
The sha256 lists catch corruption and partial uploads, not an attacker: whoever can rewrite a shard
can rewrite the lists too, which is why loading must be safe on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

COMMITTED = "COMMITTED"
DEEPSPEED_DIR = "deepspeed"
EMA_FILE = "ema.safetensors"
UNET_FILE = "unet.safetensors"
VAE_FILE = "vae.safetensors"
"""The final checkpoint's gathered weights of the trained module: the UNet (`ldm` task) or the VAE (`vae`)."""
FILES_DIR = "files"
STATE_FILE = "train_state.json"
FORMAT = 2
"""Checkpoint format in COMMITTED; 1 (a bare "step N" marker, pickled RNG/EMA) is not readable."""


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, unsafe to load or does not belong to this run."""


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def loader_path(directory: Path, rank: int) -> Path:
    return directory / "loader" / f"rank-{rank}.json"


def rng_path(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank-{rank}.pt"


def file_list_path(directory: Path, rank: int) -> Path:
    return directory / FILES_DIR / f"rank-{rank}.json"


# --- RNG state: tensors and plain numbers, so it loads with torch.load(weights_only=True) ----------


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


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))


# --- writing (each rank into its own local folder) ---------------------------------------------


def save_rank_files(directory: Path, rank: int, *, loader: dict, rng: dict) -> None:
    loader_path(directory, rank).parent.mkdir(parents=True, exist_ok=True)
    rng_path(directory, rank).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(loader_path(directory, rank), loader)
    tmp = rng_path(directory, rank).with_name(f".rank-{rank}.pt.tmp")
    torch.save(rng, tmp)
    os.replace(tmp, rng_path(directory, rank))


def save_ema(directory: Path, ema) -> None:
    """EMA (a diffusers EMAModel) as safetensors: shadow weights as tensors, scalars as JSON metadata."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {f"shadow_params.{i}": t.detach().cpu().contiguous() for i, t in enumerate(state["shadow_params"])}
    scalars = {k: v for k, v in state.items() if k != "shadow_params"}
    tmp = directory / f".{EMA_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"ema": json.dumps(scalars), "count": str(len(tensors))})
    os.replace(tmp, directory / EMA_FILE)


def save_unet_weights(directory: Path, weights: dict[str, torch.Tensor], *, step: int, name: str = UNET_FILE) -> None:
    """The gathered state dict of the trained module (rank 0, final checkpoint) as safetensors,
    written atomically; `name` is the task's weights file (UNET_FILE or VAE_FILE)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    tmp = directory / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"step": str(step), "format": f"ldmflow-{name.split('.')[0]}"})
    os.replace(tmp, directory / name)


def load_unet_weights(directory: Path, name: str = UNET_FILE) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / name), device="cpu")


def listed_files(directory: Path, rank: int) -> dict[str, dict]:
    """The files rank `rank` listed (call after read_state, which checks the list's digest)."""
    return json.loads(file_list_path(Path(directory), rank).read_text())["files"]


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
    if len(file_lists) != state.world_size:
        raise CheckpointError(f"{len(file_lists)} rank file lists for a world of {state.world_size}")
    write_json_atomic(directory / STATE_FILE, asdict(state))
    write_json_atomic(directory / COMMITTED, {
        "format": FORMAT,
        "step": state.step,
        "tag": state.tag,
        "world_size": state.world_size,
        "train_state_sha256": sha256_file(directory / STATE_FILE),
        "file_lists": {f"{FILES_DIR}/rank-{r}.json": digest for r, digest in enumerate(file_lists)},
    })


# --- reading ----------------------------------------------------------------------------------


def read_state(directory: str | Path, *, verify_hashes: bool = False,
               only: Callable[[str], bool] | None = None) -> TrainState:
    """Load train_state.json of a checkpoint after checking that it is committed and that every
    file each rank listed is there with its size (and sha256 when `verify_hashes`).

    `only` narrows the file check to the listed files it selects (a partial local copy, e.g. the
    export's, which fetches the UNet weights but not the optimizer shards); the marker, state and
    file lists are always checked."""
    directory = Path(directory)
    marker_path = directory / COMMITTED
    if not marker_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {COMMITTED} marker: it is incomplete")
    try:
        marker = json.loads(marker_path.read_text())
        world_size, file_lists = int(marker["world_size"]), dict(marker["file_lists"])
        state_digest = str(marker["train_state_sha256"])
        if marker.get("format") != FORMAT:
            raise ValueError(f"format {marker.get('format')}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{marker_path} is not a format-{FORMAT} marker ({e}): the checkpoint is corrupt or was written "
            "by an older ldmflow whose checkpoints held pickled state; retrain or resume from a newer one"
        ) from None

    _check_digest(directory, STATE_FILE, state_digest)
    state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
    if state.world_size != world_size or state.step != marker.get("step") or state.tag != marker.get("tag"):
        raise CheckpointError(f"{directory / STATE_FILE} disagrees with {marker_path} on step, tag or world size")

    deepspeed_files = 0
    for rank in range(world_size):
        list_name = f"{FILES_DIR}/rank-{rank}.json"
        if list_name not in file_lists:
            raise CheckpointError(f"{marker_path} names no file list for rank {rank} of {world_size}")
        _check_digest(directory, list_name, file_lists[list_name])
        listed = json.loads((directory / list_name).read_text())["files"]
        for required in (loader_path(Path(), rank), rng_path(Path(), rank)):
            if required.as_posix() not in listed:
                raise CheckpointError(f"{directory / list_name} does not list {required.as_posix()}")
        for rel, meta in listed.items():
            deepspeed_files += rel.startswith(f"{DEEPSPEED_DIR}/{state.tag}/")
            if only is None or only(rel):
                _check_listed_file(directory, rel, meta, verify_hashes)
    if not deepspeed_files:
        raise CheckpointError(f"checkpoint {directory} lists no files under {DEEPSPEED_DIR}/{state.tag}/")
    return state


def _check_digest(directory: Path, rel: str, expected: str) -> None:
    path = directory / rel
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} is missing {rel}, which {COMMITTED} names")
    if sha256_file(path) != expected:
        raise CheckpointError(f"{path} does not match the sha256 in {COMMITTED}: it was changed after commit")


def _check_listed_file(directory: Path, rel: str, meta: dict, verify_hashes: bool) -> None:
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or ".." in parts:
        raise CheckpointError(f"checkpoint {directory} lists a path outside itself: {rel!r}")
    path = directory / rel
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} is missing {rel} (listed by a rank; not uploaded?)")
    size = path.stat().st_size
    if size != meta["size"]:
        raise CheckpointError(f"{path} has {size} bytes but its rank listed {meta['size']}: truncated or changed")
    if verify_hashes and sha256_file(path) != meta["sha256"]:
        raise CheckpointError(f"{path} does not match the sha256 its rank listed: corrupt or changed")


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

    with _module_torch_load(zero_to_fp32):
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
def _module_torch_load(module) -> Iterator[None]:
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
