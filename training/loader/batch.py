"""Samples as the model sees them: decoding, the uint8 Batch, its move to the device, and the
held-out split chosen by a hash of each key.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from data_prep.dataset import Dataset, ShardRef, read_samples
from training.errors import DataError
from training.loader.latents import decode_latent_sample, latents_info, read_empty_text
from training.loader.tar_reader import ShardReader

log = logging.getLogger(__name__)


IMAGE_EXTS = ("jpg", "png", "webp")


def held_out(key: str, fraction: float) -> bool:
    """Whether the sample `key` belongs to the held-out split of size `fraction`: by a hash of the key
    alone, so the split is the same whatever the shards, their order, the worker count or the run."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"ldm-hold").digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def trains_on_any(dataset: Dataset, fraction: float) -> bool:
    """Whether the held-out split of size `fraction` leaves `dataset` any sample to train on. Reads
    the parts' sample lists (keys only) until one key is not held out; parts written without a list
    are read through their tar headers. Cheap unless the answer is no."""
    for part in dataset.parts:
        if any(not held_out(r.key, fraction) for r in read_samples(part.uri, part.manifest)):
            return True
    if all(part.manifest.samples_file for part in dataset.parts):
        return False
    return any(not held_out(key, fraction) for shard in dataset.shards for key in shard_keys(shard))


def shard_keys(shard: ShardRef) -> Iterator[str]:
    """The sample keys of one shard, from its tar headers (no image is read)."""
    reader = ShardReader(shard.uri, seek=(0, 0), first=0)
    try:
        for _ in range(shard.samples):
            yield reader.read(with_data=False)[0]
    finally:
        reader.close()


def read_split(dataset: Dataset, fraction: float, resolution: int, limit: int, *, held: bool = True) -> Batch:
    """The first `limit` samples of `dataset` in shard order (the same ones every time) in the held-out
    split (`held`) or the training split, as one Batch; DataError when the split has none. Reads
    shards front to back until it has enough. A latent dataset gives its latents and text states."""
    info = latents_info(dataset)
    decoded: list[tuple] = []
    captions: list[str] = []
    keys: list[str] = []
    for shard in dataset.shards:
        reader = ShardReader(shard.uri, seek=(0, 0), first=0)
        try:
            for _ in range(shard.samples):
                key, members, _, _ = reader.read()
                if held_out(key, fraction) != held:
                    continue
                sample = {"__key__": key, **members}
                try:
                    if info is not None:
                        latent, text, caption = decode_latent_sample(sample, info)
                        decoded.append((latent, text))
                    else:
                        image, caption = decode_sample(sample, resolution)
                        decoded.append((image,))
                except DataError:
                    raise
                except Exception as e:  # noqa: BLE001 -- counted by the training streams; here just not used
                    log.warning("held-out sample %s does not decode: %s", key, e)
                    continue
                captions.append(caption)
                keys.append(key)
                if len(keys) == limit:
                    break
        finally:
            reader.close()
        if len(keys) == limit:
            break
    if not keys:
        which = "holds out none" if held else "leaves none for training"
        raise DataError(f"validation.holdout_fraction={fraction} {which} of the {dataset.total_samples} samples; "
                        "change it or add data")
    if info is not None:
        return Batch(pixels=torch.empty(0, dtype=torch.uint8), captions=captions, keys=keys,
                     latents=torch.stack([d[0] for d in decoded]), text_states=torch.stack([d[1] for d in decoded]),
                     empty_text=read_empty_text(dataset, info))
    return Batch(pixels=torch.stack([d[0] for d in decoded]), captions=captions, keys=keys)


class Undecodable(Exception):
    """A sample without a usable image; its reason names the skip counter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_sample(sample: dict, resolution: int) -> tuple[torch.Tensor, str]:
    """(uint8 pixels (3, R, R), caption) of a {"__key__": key, ext: bytes} sample. DataError for an
    image of the wrong size (re-shard); any other exception means this one sample cannot be used."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise Undecodable("missing_image")
    image = Image.open(io.BytesIO(sample[ext]))
    if image.size != (resolution, resolution):
        raise DataError(
            f"shard sample {sample['__key__']} is {image.size[0]}x{image.size[1]} but model.resolution is "
            f"{resolution}; re-shard with --resolution {resolution}"
        )
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy: torch refuses read-only arrays
    caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
    return torch.from_numpy(array).permute(2, 0, 1), caption


def to_model_input(pixels: torch.Tensor, device: torch.device | str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (B, 3, R, R) -> `dtype` in [-1, 1] on `device`: the copy moves a quarter of the bytes
    of float32 and overlaps compute when the batch is pinned (non_blocking); the scaling runs there."""
    x = pixels.to(device, non_blocking=True).to(torch.float32).div_(127.5).sub_(1.0)
    return x.to(dtype)


@dataclass
class Batch:
    pixels: torch.Tensor
    """Images as uint8, shape (B, 3, R, R); `to_model_input` makes the model's input on the device."""
    captions: list[str]
    keys: list[str]
    epochs: list[int] = field(default_factory=list)
    """The epoch of each sample (a batch may straddle two)."""
    stream: int = 0
    """The stream that produced it."""
    state: dict | None = None
    """Its stream's StreamState.to_dict() right after this batch."""
    latents: torch.Tensor | None = None
    """From a latent dataset (training.loader.latents): float16 (B, 2C, h, w) scaled posterior mean and std;
    `pixels` is then empty."""
    text_states: torch.Tensor | None = None
    """From a latent dataset: float16 (B, L, D) text states of the captions."""
    empty_text: torch.Tensor | None = None
    """From a latent dataset: float16 (L, D) states of the empty caption (caption dropout)."""

    @property
    def epoch(self) -> int:
        """The epoch its stream is in after it: the lowest epoch of a sample the stream has still to yield."""
        return int(self.state["epoch"]) if self.state else max(self.epochs, default=0)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True)."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return Batch(pixels=self.pixels.pin_memory(), captions=self.captions, keys=self.keys, epochs=self.epochs,
                     stream=self.stream, state=self.state, latents=pin(self.latents),
                     text_states=pin(self.text_states), empty_text=self.empty_text)
