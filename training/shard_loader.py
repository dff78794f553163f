"""Each rank's stream of training batches, read from WebDataset shards (local or s3://) for GPUs.

The dataset is read through its index (all parts) or a single manifest; shards stream through the
storage layer, so `s3://` data never touches local disk.

Streams. A run has S = world_size * max(1, loader_workers) logical streams; rank r owns streams
r*nw .. r*nw+nw-1 and DataLoader worker j of rank r runs stream r*nw+j (with loader_workers=0 the
rank runs its one stream in-process). Each stream is infinite: when its piece of an epoch is read it
goes on with its piece of the next one, so a batch may straddle two epochs.

Epoch plan. Per (seed, epoch) the shard list is shuffled; the shuffled shards, concatenated, are one
index space of T samples, cut into S contiguous pieces of T // S or T // S + 1 samples (which
streams get the extra sample rotates with the epoch). So every sample of an epoch is read exactly
once across all ranks, whatever the shard count or sizes (uneven shards, fewer shards than ranks),
and nothing is dropped. A piece is a list of segments: (shard, first sample, end sample).

Within a stream, samples come from a random one of the first `mix_shards` unfinished segments of the
epoch (drawn by a hash of seed, epoch, stream and draw count: deterministic, no global RNG), then pass
through a shuffle buffer of `shuffle_buffer` raw samples, drained at the end of the stream's piece: a
stream yields all of its piece of one epoch before any sample of the next. The buffer is checkpointed
exactly: the state lists each buffered sample by reference (epoch, shard, sample index, byte where it
starts), and a resumed stream fetches a buffered sample again (one ranged read) only when it is picked.

Position. A stream's state (`StreamState`, plain JSON) holds its buffer and its remaining segments,
for each the index of the next unread sample and the byte where a known sample starts in the tar. A
resume opens each shard at that byte (a seek for local files, a ranged GET for S3) and never reads,
let alone decodes, what was consumed before. Stepping over samples by their tar headers (a seek past each
member's data locally; read-and-discard bytes on S3, no decoding) happens only where a segment starts
at a sample whose byte is not known: a piece that starts mid-shard (at most one per stream and
epoch) and the cut points of an elastic re-split.

Batches carry uint8 pixels; `to_model_input` moves them to the device and normalises them there.
Every yielded Batch carries its stream's state after it, and ShardStream keeps the state of the
batches actually handed to the trainer, so `ShardStream.state` is exact although the DataLoader
prefetches batches that were never used. Every rank yields batches forever, always full ones (an
undecodable sample is counted and replaced by the stream's next sample), so ranks never disagree on
the number of batches, which would hang DeepSpeed's collectives.

Elastic resume: `LoaderState.resplit` turns the states saved by every rank of a run with W ranks into
this rank's state in a run with W' ranks (or another number of loader workers). See its docstring.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import multiprocessing
import os
import random
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from data_prep import storage
from data_prep.dataset import Dataset, ShardRef, read_dataset
from training.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "png", "webp")
STATE_VERSION = 2
"""Version of LoaderState.to_dict's format; version 1 (epoch/consumed/taken) counted samples to replay."""


# ------------------------------------------------------------------------------------------ state


@dataclass(slots=True)
class Segment:
    """Consecutive samples [start, end) of one shard that a stream reads in one epoch, and how far it got."""

    epoch: int
    shard: str
    """URI of the tar."""
    start: int
    end: int
    next: int
    """Index in the shard of the next unread sample (start <= next <= end)."""
    seek: tuple[int, int]
    """(sample, byte): sample `sample` (<= next) begins at `byte` in the tar. A reader opens the shard
    there and steps over next - sample samples by their headers; after every read seek == (next, its byte)."""

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "start": self.start, "end": self.end,
                "next": self.next, "seek": [self.seek[0], self.seek[1]]}

    @classmethod
    def from_dict(cls, d: dict) -> Segment:
        return cls(epoch=int(d["epoch"]), shard=str(d["shard"]), start=int(d["start"]), end=int(d["end"]),
                   next=int(d["next"]), seek=(int(d["seek"][0]), int(d["seek"][1])))


@dataclass(frozen=True, slots=True)
class BufferedSample:
    """A sample in a stream's shuffle buffer, by reference: its bytes are refetched after a resume."""

    epoch: int
    shard: str
    sample: int
    """Index of the sample in the shard."""
    byte: int
    """Where the sample's first member header starts in the tar."""


@dataclass
class StreamState:
    """Where one stream stands: its remaining segments and counters. Pure data (to_dict is JSON)."""

    stream: int
    streams: int
    """How many streams the run that planned `next_epoch` has (its world_size * loader workers)."""
    next_epoch: int = 0
    """The epoch whose regular piece the stream plans once `segments` are used up."""
    segments: list[Segment] = field(default_factory=list)
    """What is left to read, epoch by epoch, in order; epochs are all below next_epoch."""
    buffer: list[BufferedSample] = field(default_factory=list)
    """Samples read from the segments but not yet yielded, in buffer order."""
    draws: int = 0
    """Samples drawn from the segments in the current epoch (the mixing hash's counter)."""
    picks: int = 0
    """Samples taken out of the buffer (the shuffle hash's counter)."""
    batches: int = 0
    """Batches this stream has yielded (orders streams of one rank on resume)."""
    taken: int = 0
    """Samples put into batches (cumulative)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples read but not decodable, by reason (cumulative)."""

    @property
    def epoch(self) -> int:
        """The lowest epoch of a sample the stream has still to yield."""
        return min([b.epoch for b in self.buffer] + [self.segments[0].epoch if self.segments else self.next_epoch])

    def to_dict(self) -> dict:
        return {"stream": self.stream, "streams": self.streams, "epoch": self.epoch, "next_epoch": self.next_epoch,
                "draws": self.draws, "picks": self.picks, "batches": self.batches, "taken": self.taken,
                "skipped": dict(self.skipped), "segments": [s.to_dict() for s in self.segments],
                "buffer": [[b.epoch, b.shard, b.sample, b.byte] for b in self.buffer]}

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(stream=int(d["stream"]), streams=int(d["streams"]), next_epoch=int(d["next_epoch"]),
                   segments=[Segment.from_dict(s) for s in d["segments"]],
                   buffer=[BufferedSample(int(e), str(u), int(i), int(b)) for e, u, i, b in d.get("buffer", [])],
                   draws=int(d["draws"]), picks=int(d.get("picks", 0)), batches=int(d["batches"]),
                   taken=int(d["taken"]), skipped={str(k): int(v) for k, v in d.get("skipped", {}).items()})

    def remaining(self, epoch: int) -> int:
        """Samples of `epoch` still to yield, buffered or queued (0 for the epochs it plans later)."""
        return (sum(s.end - s.next for s in self.segments if s.epoch == epoch)
                + sum(1 for b in self.buffer if b.epoch == epoch))


@dataclass
class LoaderState:
    """Where a rank's streams stand; saved in every checkpoint (to_dict), one per rank.

    Empty (`LoaderState()`) means a fresh start. ShardStream updates the object it was given in place.
    """

    streams: list[dict] = field(default_factory=list)
    """StreamState.to_dict() of each stream this rank owns, in stream order."""

    @property
    def epoch(self) -> int:
        """The lowest epoch any of this rank's streams is reading."""
        return min((int(d["epoch"]) for d in self.streams), default=0)

    @property
    def skipped(self) -> dict[str, int]:
        """Undecodable samples by reason, summed over this rank's streams (cumulative)."""
        out: dict[str, int] = {}
        for d in self.streams:
            for reason, n in d.get("skipped", {}).items():
                out[reason] = out.get(reason, 0) + int(n)
        return out

    @property
    def taken(self) -> int:
        """Samples this rank has put into batches handed to the trainer (cumulative)."""
        return sum(int(d["taken"]) for d in self.streams)

    @property
    def consumed(self) -> int:
        """Samples this rank has read (cumulative): those taken plus those skipped."""
        return self.taken + sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, "streams": copy.deepcopy(self.streams)}

    @classmethod
    def from_dict(cls, d: dict) -> LoaderState:
        if d.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state {sorted(d)} is not version {STATE_VERSION} (it counts samples to replay, which this "
                "loader never does); resume from a checkpoint written by this version or start the run afresh"
            )
        return cls(streams=copy.deepcopy(list(d["streams"])))

    @classmethod
    def resplit(cls, states_by_old_rank: Sequence[dict | LoaderState], *, world_size: int, rank: int,
                loader_workers: int, dataset: Dataset | Sequence[ShardRef] | None = None,
                seed: int | None = None) -> LoaderState:
        """This rank's state for a run of `world_size` ranks x `loader_workers`, from the states that ALL
        ranks of the previous run saved (any world size or worker count; dicts or LoaderStates).

        With the same number of streams this just picks this rank's streams. Otherwise, for every epoch
        some old stream has not finished, what is left of that epoch (the old streams' buffered samples and
        the unread parts of their segments; the whole old piece for streams that had not reached it) is
        concatenated in old stream order and cut into near-equal contiguous pieces, one per new stream;
        after the last such epoch the new streams follow the regular plan. So within every epoch no sample
        is skipped or read twice, and each new stream finishes the oldest unfinished epoch first, then the
        next, as a stream does anyway. A new piece may start mid-segment at a sample whose byte is unknown:
        its reader steps over the samples before it by their tar headers (no decoding). Cumulative counters
        (taken, skipped) move to stream 0, so their sum over ranks is kept.

        `dataset` and `seed` must be the run's: old streams that had not reached an epoch get its regular
        piece from them. Without them (the trainer may restore before it reads the dataset) the result
        holds every old stream, and the ShardStream given it as `state` re-splits them the same way.
        """
        old = [StreamState.from_dict(d) for s in states_by_old_rank
               for d in (s.streams if isinstance(s, LoaderState) else LoaderState.from_dict(s).streams)]
        if dataset is None or seed is None:
            return cls(streams=[s.to_dict() for s in old])
        nw = max(1, loader_workers)
        shards = dataset.shards if isinstance(dataset, Dataset) else list(dataset)
        mine = list(range(rank * nw, rank * nw + nw))
        return cls(streams=[s.to_dict() for s in _fit_streams(old, mine=mine, num_streams=world_size * nw,
                                                                shards=shards, seed=seed, rank=rank,
                                                                world_size=world_size)])


def _fit_streams(old: list[StreamState], *, mine: list[int], num_streams: int, shards: Sequence[ShardRef],
                 seed: int, rank: int, world_size: int) -> list[StreamState]:
    """The states of streams `mine` from saved states: fresh, the same streams, or a re-split of all of them."""
    if not old:
        return [StreamState(stream=i, streams=num_streams) for i in mine]
    layouts = {s.streams for s in old}
    if len(layouts) != 1:
        raise DataError(f"loader states mix runs with {sorted(layouts)} streams; pass the states of one checkpoint")
    old_streams = layouts.pop()
    by_id = {s.stream: s for s in old}
    if old_streams == num_streams and all(i in by_id for i in mine):
        return [by_id[i] for i in mine]
    if sorted(by_id) != list(range(old_streams)) or len(old) != old_streams:
        raise DataError(
            f"rank {rank} of {world_size} reads loader streams {mine} of {num_streams}, but its saved state holds "
            f"streams {sorted(by_id)} of {old_streams}; to resume with another world size or number of loader "
            "workers, pass every rank's saved state to LoaderState.resplit"
        )
    return _resplit([by_id[i] for i in range(old_streams)], mine=mine, num_streams=num_streams, shards=shards,
                    seed=seed)


def _resplit(old: list[StreamState], *, mine: list[int], num_streams: int, shards: Sequence[ShardRef],
             seed: int) -> list[StreamState]:
    old_streams = len(old)
    first = min(s.epoch for s in old)
    last = max(s.next_epoch for s in old)  # exclusive: from here on every stream follows the regular plan
    new = {i: StreamState(stream=i, streams=num_streams, next_epoch=last) for i in mine}
    for epoch in range(first, last):
        plan: EpochPlan | None = None
        ranges: list[tuple[str, int, int, tuple[int, int]]] = []
        for s in old:
            ranges += [(b.shard, b.sample, b.sample + 1, (b.sample, b.byte)) for b in s.buffer if b.epoch == epoch]
            if epoch < s.next_epoch:
                segments = [seg for seg in s.segments if seg.epoch == epoch]
            else:  # this old stream had not planned the epoch yet: its whole regular piece is left
                plan = plan or plan_epoch(shards, epoch=epoch, seed=seed, streams=old_streams)
                segments = plan.pieces[s.stream]
            ranges += [(seg.shard, seg.next, seg.end, seg.seek) for seg in segments if seg.next < seg.end]
        total = sum(end - start for _, start, end, _ in ranges)
        pieces = _cut(ranges, _piece_sizes(total, num_streams, epoch), epoch)
        for i in mine:
            new[i].segments += pieces[i]
    if 0 in new:
        for s in old:
            new[0].taken += s.taken
            for reason, n in s.skipped.items():
                new[0].skipped[reason] = new[0].skipped.get(reason, 0) + n
    return [new[i] for i in mine]


# ------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    shards: list[ShardRef]
    """The dataset's shards in this epoch's order."""
    pieces: list[list[Segment]]
    """Each stream's piece of the epoch: consecutive ranges of the shards above."""


def plan_epoch(shards: Sequence[ShardRef], *, epoch: int, seed: int, streams: int) -> EpochPlan:
    """Shuffle the shards for (seed, epoch) and cut their concatenation into one piece per stream."""
    order = list(shards)
    random.Random(f"{seed}:shards:{epoch}").shuffle(order)
    total = sum(s.samples for s in order)
    ranges = [(s.uri, 0, s.samples, (0, 0)) for s in order if s.samples > 0]
    return EpochPlan(epoch=epoch, shards=order, pieces=_cut(ranges, _piece_sizes(total, streams, epoch), epoch))


def _piece_sizes(total: int, streams: int, epoch: int) -> list[int]:
    """Near-equal sizes summing to `total`; which streams get one more sample rotates with the epoch,
    so over `streams` epochs every stream reads the same number."""
    base, extra = divmod(total, streams)
    return [base + (1 if (i - epoch) % streams < extra else 0) for i in range(streams)]


def _cut(ranges: list[tuple[str, int, int, tuple[int, int]]], sizes: list[int], epoch: int) -> list[list[Segment]]:
    """Split consecutive (shard, start, end, seek) ranges into pieces of `sizes` samples."""
    pieces: list[list[Segment]] = []
    queue = deque(ranges)
    for size in sizes:
        piece: list[Segment] = []
        while size > 0:
            shard, start, end, seek = queue.popleft()
            take = min(size, end - start)
            piece.append(Segment(epoch=epoch, shard=shard, start=start, end=start + take, next=start, seek=seek))
            if start + take < end:
                # The rest of this range starts at a sample whose byte nobody knows yet: reach it from `seek`.
                queue.appendleft((shard, start + take, end, seek))
            size -= take
        pieces.append(piece)
    return pieces


def _draw(n: int, *key: object) -> int:
    """A choice among n from a hash of `key`, not a global RNG, so a resumed stream repeats it."""
    if n == 1:
        return 0
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


# --------------------------------------------------------------------------------------- tar reads


def open_shards(urls: list[str]) -> Iterator[dict]:
    """WebDataset's shard-opening stage, through the storage layer: local files or streamed S3 objects."""
    for url in urls:
        with storage.storage_for(url).open_read(url) as stream:
            yield {"url": url, "stream": stream}


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset's convention: key is the path up to the first '.' of the basename, the rest the extension."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    if not directory and base.startswith("__") and base.endswith("__"):
        return None  # WebDataset's metadata members
    return (f"{directory}/{stem}" if directory else stem), ext


class _ForwardReader:
    """tell() and forward seek() over a non-seekable stream (an S3 body): seeking reads and discards."""

    def __init__(self, f: BinaryIO, position: int):
        self._f, self._pos = f, position

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self._pos:
            raise io.UnsupportedOperation(f"cannot seek back from byte {self._pos} to {pos} in a streamed shard")
        while self._pos < pos:
            if not self.read(min(pos - self._pos, 1 << 20)):
                break
        return self._pos

    def close(self) -> None:
        self._f.close()


class ShardReader:
    """Samples of one tar shard in order, from sample `seek[0]` at byte `seek[1]` (stepping over
    samples up to `first` by their headers). Handles pax and GNU long names (tarfile parses headers)."""

    def __init__(self, uri: str, *, seek: tuple[int, int], first: int):
        self.uri = uri
        self.index, start = seek
        f = storage.storage_for(uri).open_read(uri, start=start)
        self._file: Any = f if f.seekable() else _ForwardReader(f, start)
        try:
            # TarFile starts at the file's position (tell()), so member offsets are bytes in the shard.
            self._tar = tarfile.TarFile(fileobj=self._file, mode="r")
        except tarfile.TarError as e:
            self._file.close()
            raise DataError(f"{uri} is not a tar from byte {start} ({e}); check it with `ldmflow shard verify`") from e
        self._pending: tuple[tarfile.TarInfo, str, str] | None = None
        while self.index < first:
            self.read(with_data=False)

    def _next_member(self) -> tuple[tarfile.TarInfo, str, str] | None:
        while True:
            try:
                member = self._tar.next()
            except tarfile.TarError as e:
                raise DataError(f"{self.uri} is not a valid tar ({e}); check it with `ldmflow shard verify`") from e
            if member is None:
                return None
            self._tar.members.clear()  # a stream keeps no index of the members it passed
            if not member.isreg():
                continue
            named = split_member_name(member.name)
            if named is not None:
                return member, named[0], named[1]

    def read(self, *, with_data: bool = True) -> tuple[str, dict[str, bytes], int, int | None]:
        """(key, {extension: bytes}, byte where the sample starts, byte where the next one starts or None
        at the end); with with_data=False the members' bytes are skipped (a seek locally) and the dict's
        values are empty."""
        key: str | None = None
        members: dict[str, bytes] = {}
        start = 0
        while True:
            if self._pending is None:
                self._pending = self._next_member()
                if self._pending is None:
                    if key is None:
                        raise DataError(f"{self.uri} ends before sample {self.index}, fewer than its manifest lists; "
                                        "check it with `ldmflow shard verify`")
                    self.index += 1
                    return key, members, start, None
            member, member_key, ext = self._pending
            if key is not None and (member_key != key or ext in members):
                self.index += 1
                return key, members, start, member.offset  # offset: its first header (pax/GNU ones included)
            if key is None:
                start = member.offset
            key = member_key
            # The file stands at this member's data until the next header is read.
            members[ext] = self._file.read(member.size) if with_data else b""
            if with_data and len(members[ext]) != member.size:
                raise DataError(f"{self.uri} is truncated inside {member.name}; check it with `ldmflow shard verify`")
            self._pending = None

    def close(self) -> None:
        self._file.close()


# -------------------------------------------------------------------------------- held-out split


def held_out(key: str, fraction: float) -> bool:
    """Whether the sample `key` belongs to the held-out split of size `fraction`: by a hash of the key
    alone, so the split is the same whatever the shards, their order, the worker count or the run."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"ldm-hold").digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def read_split(dataset: Dataset, fraction: float, resolution: int, limit: int, *, held: bool = True) -> Batch:
    """The first `limit` samples of `dataset` in shard order (the same ones every time) in the held-out
    split (`held`) or the training split, as one Batch; DataError when the split has none. Reads
    shards front to back until it has enough."""
    pixels: list[torch.Tensor] = []
    captions: list[str] = []
    keys: list[str] = []
    for shard in dataset.shards:
        reader = ShardReader(shard.uri, seek=(0, 0), first=0)
        try:
            for _ in range(shard.samples):
                key, members, _, _ = reader.read()
                if held_out(key, fraction) != held:
                    continue
                try:
                    image, caption = decode_sample({"__key__": key, **members}, resolution)
                except DataError:
                    raise
                except Exception as e:  # counted by the training streams; here just not used
                    log.warning("held-out sample %s does not decode: %s", key, e)
                    continue
                pixels.append(image)
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
    return Batch(pixels=torch.stack(pixels), captions=captions, keys=keys)


# ----------------------------------------------------------------------------------------- decode


class _Undecodable(Exception):
    """A sample without a usable image; its reason names the skip counter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_sample(sample: dict, resolution: int) -> tuple[torch.Tensor, str]:
    """(uint8 pixels (3, R, R), caption) of a {"__key__": key, ext: bytes} sample. DataError for an
    image of the wrong size (re-shard); any other exception means this one sample cannot be used."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise _Undecodable("missing_image")
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

    @property
    def epoch(self) -> int:
        """The epoch its stream is in after it: the lowest epoch of a sample the stream has still to yield."""
        return int(self.state["epoch"]) if self.state else max(self.epochs, default=0)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True)."""
        return Batch(pixels=self.pixels.pin_memory(), captions=self.captions, keys=self.keys, epochs=self.epochs,
                     stream=self.stream, state=self.state)


# ------------------------------------------------------------------------------------------ stream


@dataclass(frozen=True)
class _StreamConfig:
    """What a stream needs besides its state; picklable, sent to DataLoader workers."""

    shards: tuple[ShardRef, ...]
    seed: int
    batch_size: int
    resolution: int
    mix_shards: int
    shuffle_buffer: int
    holdout_fraction: float = 0.0


class _StreamReader:
    """Batches of one stream, from its state; the state advances as samples are read."""

    def __init__(self, cfg: _StreamConfig, state: StreamState):
        self.cfg, self.state = cfg, state
        self._readers: dict[int, ShardReader] = {}  # id(segment) -> open reader
        self._buffered: list[dict | None] = [None] * len(state.buffer)  # the buffer's samples; None: refetch
        self._total = sum(s.samples for s in cfg.shards)

    def _refill(self) -> None:
        st = self.state
        while not st.segments:
            plan = plan_epoch(self.cfg.shards, epoch=st.next_epoch, seed=self.cfg.seed, streams=st.streams)
            st.segments = plan.pieces[st.stream]
            st.next_epoch += 1
            st.draws = 0

    def _read(self) -> tuple[BufferedSample, dict]:
        """(reference, raw sample) of the next sample the stream reads from its segments."""
        st = self.state
        self._refill()
        epoch = st.segments[0].epoch
        window = [i for i, seg in enumerate(st.segments[:self.cfg.mix_shards]) if seg.epoch == epoch]
        i = window[_draw(len(window), self.cfg.seed, "mix", epoch, st.stream, st.draws)]
        st.draws += 1
        seg = st.segments[i]
        reader = self._readers.get(id(seg))
        if reader is None:
            reader = self._readers[id(seg)] = ShardReader(seg.shard, seek=seg.seek, first=seg.next)
        key, members, start, next_byte = reader.read()
        ref = BufferedSample(epoch=epoch, shard=seg.shard, sample=seg.next, byte=start)
        seg.next += 1
        if seg.next < seg.end:
            if next_byte is None:
                raise DataError(f"{seg.shard} ends after {seg.next} samples but its manifest lists more; "
                                "check it with `ldmflow shard verify`")
            seg.seek = (seg.next, next_byte)
        else:
            self._readers.pop(id(seg)).close()
            del st.segments[i]
            if st.segments and st.segments[0].epoch != epoch:
                st.draws = 0
            self._refill()  # eagerly: a saved state names the epoch the stream reads next
        return ref, {"__key__": key, **members}

    def _next(self) -> tuple[int, dict]:
        """(epoch, raw sample) of the next sample the stream yields: through the shuffle buffer."""
        st = self.state
        while len(st.buffer) < self.cfg.shuffle_buffer:
            self._refill()
            if st.buffer and st.segments[0].epoch != st.buffer[0].epoch:
                break  # a stream yields all of an epoch before any of the next: drain the buffer first
            ref, sample = self._read()
            st.buffer.append(ref)
            self._buffered.append(sample)
        if not st.buffer:
            ref, sample = self._read()
            return ref.epoch, sample
        # (A state saved with a larger buffer than this run's drains it: no buffered sample is lost.)
        j = _draw(len(st.buffer), self.cfg.seed, "pick", st.stream, st.picks)
        st.picks += 1
        ref, sample = st.buffer[j], self._buffered[j]
        st.buffer[j], self._buffered[j] = st.buffer[-1], self._buffered[-1]
        st.buffer.pop()
        self._buffered.pop()
        if sample is None:  # buffered before a resume: read it again, from its byte
            reader = ShardReader(ref.shard, seek=(ref.sample, ref.byte), first=ref.sample)
            try:
                key, members, _, _ = reader.read()
            finally:
                reader.close()
            sample = {"__key__": key, **members}
        return ref.epoch, sample

    def batches(self) -> Iterator[Batch]:
        cfg, st = self.cfg, self.state
        try:
            while True:
                pixels = torch.empty((cfg.batch_size, 3, cfg.resolution, cfg.resolution), dtype=torch.uint8)
                captions: list[str] = []
                keys: list[str] = []
                epochs: list[int] = []
                failures = 0
                while len(keys) < cfg.batch_size:
                    epoch, sample = self._next()
                    if held_out(sample["__key__"], cfg.holdout_fraction):
                        st.skipped["held_out"] = st.skipped.get("held_out", 0) + 1
                        continue
                    try:
                        image, caption = decode_sample(sample, cfg.resolution)
                    except DataError:
                        raise
                    except Exception as e:  # undecodable: count it and read one more sample instead
                        reason = e.reason if isinstance(e, _Undecodable) else type(e).__name__
                        st.skipped[reason] = st.skipped.get(reason, 0) + 1
                        log.warning("stream %d skips sample %s: %s", st.stream, sample["__key__"], reason)
                        failures += 1
                        if failures > self._total:
                            raise DataError(f"stream {st.stream} read {failures} samples in a row that do not decode; "
                                            "check the shards with `ldmflow shard verify`") from e
                        continue
                    failures = 0
                    pixels[len(keys)] = image
                    captions.append(caption)
                    keys.append(sample["__key__"])
                    epochs.append(epoch)
                st.batches += 1
                st.taken += cfg.batch_size
                yield Batch(pixels=pixels, captions=captions, keys=keys, epochs=epochs, stream=st.stream,
                            state=st.to_dict())
        finally:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()


def _aws_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


class _StreamDataset(torch.utils.data.IterableDataset):
    """DataLoader worker j runs stream `states[j]`; pickled into each worker."""

    def __init__(self, cfg: _StreamConfig, states: list[dict], environment: dict[str, str]):
        self.cfg, self.states, self.environment = cfg, states, environment

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            # A forkserver child has the environment of the forkserver's start, not of this run: set the
            # S3 settings ShardStream saw, and build this process's own boto3 client.
            for key in [k for k in os.environ if k.startswith("AWS_") and k not in self.environment]:
                del os.environ[key]
            os.environ.update(self.environment)
            storage.reset_clients()
        state = StreamState.from_dict(self.states[info.id if info is not None else 0])
        return _StreamReader(self.cfg, state).batches()


_PRELOADED = False


def _preload_forkserver() -> None:
    """Have the forkserver import torch and this module once, so each loader worker forks with them
    (otherwise every worker spends seconds importing torch). Takes effect only if it has not started."""
    global _PRELOADED
    if not _PRELOADED:
        multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", __name__])
        _PRELOADED = True


class ShardStream:
    """Infinite batches for one rank, resumable exactly from `state` (a LoaderState it updates in place).

    Each stream mixes samples from `mix_shards` open shards, then through a `shuffle_buffer` of raw
    (undecoded) samples (0 or 1: none). `loader_workers` > 0 decodes in that many DataLoader worker
    processes (one stream each), with `prefetch_factor` batches prefetched per worker and pinned memory
    if asked; 0 reads one stream in this process (tests, debugging). Workers start with
    `multiprocessing_context` ("forkserver" by default: the trainer runs torch, gloo and DeepSpeed
    threads, which fork would copy mid-flight; each worker then costs a fork of a server that has
    imported torch once, about a second the first time).
    """

    def __init__(self, data: str, *, rank: int, world_size: int, batch_size: int, resolution: int, seed: int,
                 state: LoaderState | None = None, dataset: Dataset | None = None, loader_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool = False, mix_shards: int = 4, shuffle_buffer: int = 0,
                 holdout_fraction: float = 0.0, multiprocessing_context: str = "forkserver"):
        for name, value, low in (("world_size", world_size, 1), ("batch_size", batch_size, 1),
                                 ("resolution", resolution, 1), ("loader_workers", loader_workers, 0),
                                 ("prefetch_factor", prefetch_factor, 1), ("mix_shards", mix_shards, 1),
                                 ("shuffle_buffer", shuffle_buffer, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ShardStream `{name}` must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream `rank` must be in 0..{world_size - 1}, got {rank!r}")
        self.data = str(data)
        self.dataset = dataset or read_dataset(self.data)
        self.rank, self.world_size = rank, world_size
        self.loader_workers = loader_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.multiprocessing_context = multiprocessing_context
        per_rank = max(1, loader_workers)
        self.num_streams = world_size * per_rank
        self.stream_ids = list(range(rank * per_rank, (rank + 1) * per_rank))
        shards = tuple(self.dataset.shards)
        total = sum(s.samples for s in shards)
        # Fail before training starts, not after the first allreduce.
        if total // self.num_streams < batch_size:
            workers = f" x {loader_workers} loader workers" if loader_workers > 1 else ""
            raise DataError(
                f"{total} samples cannot give {world_size} workers{workers} a batch of {batch_size} each; "
                "add data or lower train.batch_size / train.num_workers" + (" / loader_workers" if workers else "")
            )
        self.cfg = _StreamConfig(shards=shards, seed=seed, batch_size=batch_size, resolution=resolution,
                                 mix_shards=mix_shards, shuffle_buffer=shuffle_buffer,
                                 holdout_fraction=holdout_fraction)
        self.state = state if state is not None else LoaderState()
        fitted = _fit_streams([StreamState.from_dict(d) for d in self.state.streams], mine=self.stream_ids,
                              num_streams=self.num_streams, shards=shards, seed=seed, rank=rank,
                              world_size=world_size)
        self.state.streams = [s.to_dict() for s in fitted]

    def __iter__(self) -> Iterator[Batch]:
        """Batches in a fixed order: the stream with the fewest batches yielded next (lowest id on ties),
        i.e. round-robin over this rank's streams, continued exactly on resume."""
        if self.loader_workers == 0:
            source = _StreamReader(self.cfg, StreamState.from_dict(self.state.streams[0])).batches()
            pin = self.pin_memory and torch.cuda.is_available()
            for batch in source:
                self.state.streams[0] = batch.state
                yield batch.pin_memory() if pin else batch
            return
        if self.multiprocessing_context == "forkserver":
            _preload_forkserver()
        loader = torch.utils.data.DataLoader(
            _StreamDataset(self.cfg, copy.deepcopy(self.state.streams), _aws_environment()),
            batch_size=None, num_workers=self.loader_workers, prefetch_factor=self.prefetch_factor,
            pin_memory=self.pin_memory, persistent_workers=True,
            multiprocessing_context=self.multiprocessing_context,
        )
        source = iter(loader)
        pending: dict[int, deque[Batch]] = {i: deque() for i in self.stream_ids}
        try:
            while True:
                counts = [int(d["batches"]) for d in self.state.streams]
                position = min(range(len(counts)), key=lambda j: (counts[j], j))
                want = self.stream_ids[position]
                # The DataLoader hands out its workers' batches round-robin from worker 0; after a resume
                # the next stream may be another one, so hold the others' batches (at most one each).
                while not pending[want]:
                    batch = next(source)
                    pending[batch.stream].append(batch)
                batch = pending[want].popleft()
                self.state.streams[position] = batch.state
                yield batch
        finally:
            del source, loader  # shuts the workers down
