"""Each worker's stream of training batches, read from WebDataset shards (local or s3://).

The dataset is read through its index (all parts) or a single manifest; shards stream through the
storage layer, so `s3://` data never touches local disk. The stream is a pure function of
(dataset, rank, world size, seed, epoch), so a resumed run can
regenerate it and skip exactly the samples it already consumed: no sample is seen twice or missed
within an epoch. Every rank takes the same number of batches per epoch, because DeepSpeed's
collectives hang when one rank runs out of data before the others.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_prep import storage
from data_prep.dataset import Dataset, ShardRef, read_dataset
from training.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "png", "webp")


@dataclass
class LoaderState:
    """Where a rank's stream stands; saved in every checkpoint."""

    epoch: int = 0
    consumed: int = 0
    """Samples this rank has read from its stream in the current epoch, skipped ones included."""
    taken: int = 0
    """Samples this rank has put into batches in the current epoch."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples dropped by reason (cumulative)."""

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "taken": self.taken, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> LoaderState:
        return cls(epoch=int(d["epoch"]), consumed=int(d["consumed"]), taken=int(d["taken"]),
                   skipped=dict(d.get("skipped", {})))


@dataclass
class Batch:
    pixels: torch.Tensor
    """Images as float32 in [-1, 1], shape (B, 3, R, R)."""
    captions: list[str]
    keys: list[str]


@dataclass(frozen=True)
class EpochPlan:
    urls: list[str]
    """Shards this rank reads in this epoch, in order."""
    stride: int
    """Take every stride-th sample of those shards (when there are fewer shards than ranks)."""
    offset: int
    samples: int
    """Samples this rank takes in this epoch: equal on every rank, a multiple of the batch size."""


def plan_epoch(shard_list: list[ShardRef], *, rank: int, world_size: int, epoch: int, seed: int,
               batch_size: int) -> EpochPlan:
    shards = list(shard_list)
    random.Random(f"{seed}:shards:{epoch}").shuffle(shards)
    if len(shards) >= world_size:
        mine = shards[rank::world_size]
        per_rank = min(sum(s.samples for s in shards[r::world_size]) for r in range(world_size))
        stride, offset = 1, 0
    else:
        # Too few shards to give each rank its own: everyone reads all and keeps every n-th sample.
        mine = shards
        per_rank = sum(s.samples for s in shards) // world_size
        stride, offset = world_size, rank
    samples = (per_rank // batch_size) * batch_size
    if samples == 0:
        total = sum(s.samples for s in shards)
        raise DataError(
            f"{total} samples cannot give {world_size} workers a batch of {batch_size} each; "
            "add data or lower train.batch_size / train.num_workers"
        )
    return EpochPlan(urls=[s.uri for s in mine], stride=stride, offset=offset, samples=samples)


def open_shards(urls: list[str]) -> Iterator[dict]:
    """WebDataset's shard-opening stage, through the storage layer: local files or streamed S3 objects."""
    for url in urls:
        with storage.storage_for(url).open_read(url) as stream:
            yield {"url": url, "stream": stream}


def _raw_samples(plan: EpochPlan, *, seed: int, epoch: int, rank: int, shuffle_buffer: int) -> Iterator[dict]:
    samples = group_by_keys(tar_file_expander(open_shards(plan.urls)))
    stream = (s for i, s in enumerate(samples) if i % plan.stride == plan.offset)
    if shuffle_buffer > 1:
        # Seeded per (seed, epoch, rank): a resumed run replays the same order.
        rng = random.Random(f"{seed}:buffer:{epoch}:{rank}")
        stream = wds.filters._shuffle(stream, bufsize=shuffle_buffer, initial=shuffle_buffer, rng=rng)
    return iter(stream)


def decode_sample(sample: dict, resolution: int) -> tuple[torch.Tensor, str]:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise KeyError("no image member")
    image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
    if image.size != (resolution, resolution):
        raise DataError(
            f"shard sample {sample['__key__']} is {image.size[0]}x{image.size[1]} but model.resolution is "
            f"{resolution}; re-shard with --resolution {resolution}"
        )
    caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1), caption


class ShardStream:
    """Infinite batches for one rank, epoch after epoch, resumable from a LoaderState."""

    def __init__(self, data: str, *, rank: int, world_size: int, batch_size: int, resolution: int,
                 seed: int, shuffle_buffer: int, state: LoaderState | None = None,
                 dataset: Dataset | None = None):
        self.data = str(data)
        self.dataset = dataset or read_dataset(self.data)
        self.shards = self.dataset.shards
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.resolution = batch_size, resolution
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.state = state or LoaderState()
        # Fail before training starts, not after the first allreduce.
        self.plan(self.state.epoch)

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.shards, rank=self.rank, world_size=self.world_size,
                          epoch=epoch, seed=self.seed, batch_size=self.batch_size)

    def _decode(self, sample: dict, *, count_skip: bool) -> tuple[torch.Tensor, str] | None:
        try:
            return decode_sample(sample, self.resolution)
        except DataError:
            raise
        except Exception as e:  # undecodable member: count it; the caller keeps rank counts equal
            if count_skip:
                reason = type(e).__name__
                self.state.skipped[reason] = self.state.skipped.get(reason, 0) + 1
                log.warning("skipping sample %s: %s", sample.get("__key__"), e)
            return None

    def _epoch_items(self, epoch: int) -> Iterator[tuple[int, str, torch.Tensor, str]]:
        """(raw position after the item, key, pixels, caption) for the rest of one epoch.

        The raw position counts every sample read, decodable or not, so a resume skips exactly
        what was read before, without decoding it. Items run until `plan.samples` were taken.
        """
        plan = self.plan(epoch)
        raw = _raw_samples(plan, seed=self.seed, epoch=epoch, rank=self.rank, shuffle_buffer=self.shuffle_buffer)
        # Skipped samples would leave this rank short, so the epoch order is followed by a top-up
        # pass over the same samples, unshuffled: every rank still takes the same number of batches.
        topup = _raw_samples(plan, seed=self.seed, epoch=epoch, rank=self.rank, shuffle_buffer=0)
        taken, start = self.state.taken, self.state.consumed
        for position, (in_topup, sample) in enumerate(
            itertools.chain(((False, s) for s in raw), ((True, s) for s in topup)), start=1
        ):
            if taken >= plan.samples:
                return
            if position <= start:  # resume: replay the order without decoding
                continue
            decoded = self._decode(sample, count_skip=not in_topup)
            if decoded is None:
                continue
            taken += 1
            yield position, sample["__key__"], decoded[0], decoded[1]
        if taken < plan.samples:
            raise DataError(f"rank {self.rank} found only {taken} decodable samples in epoch {epoch}")

    def __iter__(self) -> Iterator[Batch]:
        while True:
            epoch = self.state.epoch
            buf: list[tuple[int, str, torch.Tensor, str]] = []
            for item in self._epoch_items(epoch):
                buf.append(item)
                if len(buf) == self.batch_size:
                    self.state.consumed = buf[-1][0]
                    self.state.taken += len(buf)
                    yield Batch(
                        pixels=torch.stack([p for _, _, p, _ in buf]),
                        captions=[c for _, _, _, c in buf],
                        keys=[k for _, k, _, _ in buf],
                    )
                    buf = []
            self.state.epoch, self.state.consumed, self.state.taken = epoch + 1, 0, 0
