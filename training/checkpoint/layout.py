"""Checkpoint layout and the completeness protocol (COMMITTED).

One checkpoint directory holds everything a resume needs, saved together and restored together::

    deepspeed/<tag>/...      DeepSpeed engine: UNet, optimizer, LR schedule (each rank its part)
    ema.safetensors          EMA of the UNet (rank 0), scalars in the safetensors metadata
    unet.safetensors         final checkpoint only: the full UNet state dict in the engine's training
                             dtype, gathered by every rank (a collective under ZeRO-3), written by rank 0
    loader/rank-<r>.json     each rank's stream position (epoch, samples consumed)
    rng/rank-<r>.pt          each rank's generators, as tensors and plain numbers only
    files/rank-<r>.json      every file rank r wrote above, with its size and sha256
    train_state.json         step, samples seen, world size, resolved config, frozen-weight hashes
    universal/               added on the first resume on another number of workers: the universal
                             conversion, marked complete by its own universal/COMMITTED
    COMMITTED                JSON: step, tag, world size, sha256 of train_state.json and of every
                             rank's file list; written last, by rank 0, once every rank's files are in

Completeness. Each rank saves into its own local folder and reports it with
``ray.train.report(checkpoint=...)``; Ray (2.60) copies every rank's folder into the same storage
directory independently, and registers the checkpoint once all ranks reported. The upload function
(training.runtime.checkpoint_commit) hashes each rank's files into its list first, in the upload
thread, and rank 0 writes ``train_state.json`` and ``COMMITTED`` into storage only once every rank's
list and every file it names are there at their sizes: the marker is *truthful*. The real guarantee
is still the reader's: :func:`training.checkpoint.verify.read_state` trusts a checkpoint only
when ``COMMITTED`` is there, ``train_state.json`` and every rank's file list match the digests it
names, and every listed file is present with its listed size (and sha256, with
``verify_hashes=True``, which resume uses).
DeepSpeed writes its ``latest`` file before all ranks finish, so nothing here reads it.

Loading is safe on its own (see training.checkpoint.loading): the lists catch corruption and
partial uploads, not an attacker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

COMMITTED = "COMMITTED"


DEEPSPEED_DIR = "deepspeed"


EMA_FILE = "ema.safetensors"


UNET_FILE = "unet.safetensors"


VAE_FILE = "vae.safetensors"
"""The final checkpoint's gathered weights of the trained module: the UNet (`ldm` task) or the VAE (`vae`)."""


FILES_DIR = "files"


UNIVERSAL_DIR = "universal"
"""The checkpoint's DeepSpeed state converted once for another number of workers, with its own
COMMITTED (training.checkpoint.universal_store); no rank lists it, and only an elastic resume reads it."""


STATE_FILE = "train_state.json"


CHECKPOINT_PREFIX = "checkpoint_"
"""Ray names checkpoint folders checkpoint_<%Y-%m-%d_%H-%M-%S.%f> unless report() names them."""
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
    global_batch: int = 0
    """Samples per optimizer step over all ranks (0 in checkpoints written before it was recorded)."""
    dataset_content_id: str = ""
    """The content id of the dataset the loader positions point into ("" in checkpoints written
    before it was recorded): a resume on other data must not follow them."""


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
