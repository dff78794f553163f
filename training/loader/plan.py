"""Where each stream is: the epoch plan that cuts every epoch into one piece per stream, the
JSON-able stream and loader states a checkpoint saves, and their re-split over another layout.
See the package docstring.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from data_prep.dataset import Dataset, ShardRef
from training.errors import DataError

log = logging.getLogger(__name__)


STATE_VERSION = 2
"""Version of LoaderState.to_dict's format; version 1 (epoch/consumed/taken) counted samples to replay."""


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
        return cls(streams=[s.to_dict() for s in fit_streams(old, mine=mine, num_streams=world_size * nw,
                                                                shards=shards, seed=seed, rank=rank,
                                                                world_size=world_size)])


def restart_at_next_epoch(states_by_old_rank: Sequence[dict], *, world_size: int, rank: int,
                          loader_workers: int) -> LoaderState:
    """This rank's fresh state after the epoch the saved run was in: for a resume on data that changed
    (other shards), where the saved positions would point into the wrong tars. Every stream starts the
    epoch after the latest one any old stream had reached; the cumulative counters (taken, skipped)
    move to stream 0 of rank 0, so their sum over ranks is kept."""
    old = [StreamState.from_dict(d) for s in states_by_old_rank for d in LoaderState.from_dict(s).streams]
    epoch = max((s.epoch for s in old), default=-1) + 1
    nw = max(1, loader_workers)
    streams = [StreamState(stream=i, streams=world_size * nw, next_epoch=epoch)
               for i in range(rank * nw, rank * nw + nw)]
    if rank == 0:
        streams[0].taken = sum(s.taken for s in old)
        for s in old:
            for reason, n in s.skipped.items():
                streams[0].skipped[reason] = streams[0].skipped.get(reason, 0) + n
    return LoaderState(streams=[s.to_dict() for s in streams])


def fit_streams(old: list[StreamState], *, mine: list[int], num_streams: int, shards: Sequence[ShardRef],
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


def draw_index(n: int, *key: object) -> int:
    """A choice among n from a hash of `key`, not a global RNG, so a resumed stream repeats it."""
    if n == 1:
        return 0
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n
