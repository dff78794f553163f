"""ShardStream: one rank's infinite, exactly resumable batches, decoded in DataLoader processes.
See the package docstring.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from data_prep import storage
from data_prep.checks import require_int
from data_prep.dataset import Dataset, ShardRef, read_dataset
from training.errors import DataError
from training.loader.batch import Batch, Undecodable, decode_sample, held_out
from training.loader.latents import LatentsInfo, decode_latent_sample, latents_info, read_empty_text
from training.loader.lifetime import die_with_parent
from training.loader.plan import BufferedSample, LoaderState, StreamState, draw_index, fit_streams, plan_epoch
from training.loader.tar_reader import ShardReader

log = logging.getLogger(__name__)


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
    latents: LatentsInfo | None = None
    """Set for a latent dataset: batches carry its latents and text states instead of pixels."""
    empty_text: torch.Tensor | None = None
    """A latent dataset's empty-caption states, handed on with every batch."""


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
        i = window[draw_index(len(window), self.cfg.seed, "mix", epoch, st.stream, st.draws)]
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
        j = draw_index(len(st.buffer), self.cfg.seed, "pick", st.stream, st.picks)
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

    def _empty_batch(self) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        if cfg.latents is None:
            return (torch.empty((cfg.batch_size, 3, cfg.resolution, cfg.resolution), dtype=torch.uint8),)
        return (torch.empty((cfg.batch_size, *cfg.latents.latent_shape), dtype=torch.float16),
                torch.empty((cfg.batch_size, *cfg.latents.text_shape), dtype=torch.float16))

    def _decode(self, sample: dict) -> tuple[tuple[torch.Tensor, ...], str]:
        """(tensors, caption) of a raw sample: the pixels, or a latent sample's moments and text states."""
        if self.cfg.latents is not None:
            latent, text, caption = decode_latent_sample(sample, self.cfg.latents)
            return (latent, text), caption
        image, caption = decode_sample(sample, self.cfg.resolution)
        return (image,), caption

    def batches(self) -> Iterator[Batch]:
        cfg, st = self.cfg, self.state
        try:
            while True:
                tensors = self._empty_batch()
                captions: list[str] = []
                keys: list[str] = []
                epochs: list[int] = []
                failures = held = 0
                while len(keys) < cfg.batch_size:
                    epoch, sample = self._next()
                    if held_out(sample["__key__"], cfg.holdout_fraction):
                        st.skipped["held_out"] = st.skipped.get("held_out", 0) + 1
                        held += 1
                        if held > self._total:  # the driver refuses such a split; never spin here
                            raise DataError(f"stream {st.stream} read {held} held-out samples in a row: "
                                            f"holdout_fraction={cfg.holdout_fraction} leaves it nothing to train on")
                        continue
                    held = 0
                    try:
                        decoded, caption = self._decode(sample)
                    except DataError:
                        raise
                    except Exception as e:  # undecodable: count it and read one more sample instead
                        reason = e.reason if isinstance(e, Undecodable) else type(e).__name__
                        st.skipped[reason] = st.skipped.get(reason, 0) + 1
                        log.warning("stream %d skips sample %s: %s", st.stream, sample["__key__"], reason)
                        failures += 1
                        if failures > self._total:
                            raise DataError(f"stream {st.stream} read {failures} samples in a row that do not decode; "
                                            "check the shards with `ldmflow shard verify`") from e
                        continue
                    failures = 0
                    for out, value in zip(tensors, decoded):
                        out[len(keys)] = value
                    captions.append(caption)
                    keys.append(sample["__key__"])
                    epochs.append(epoch)
                st.batches += 1
                st.taken += cfg.batch_size
                if cfg.latents is None:
                    yield Batch(pixels=tensors[0], captions=captions, keys=keys, epochs=epochs, stream=st.stream,
                                state=st.to_dict())
                else:
                    yield Batch(pixels=torch.empty(0, dtype=torch.uint8), captions=captions, keys=keys, epochs=epochs,
                                stream=st.stream, state=st.to_dict(), latents=tensors[0], text_states=tensors[1],
                                empty_text=cfg.empty_text)
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
            die_with_parent()  # a worker outlives neither its fork server nor, through it, the trainer
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
        # forkserver_preload ties the server's life to the trainer's (training.loader.lifetime).
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["training.loader.forkserver_preload", "torch", __name__])
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
            require_int(value, f"ShardStream `{name}`", low, error=ValueError)
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
        # A latent dataset (`ldmflow encode`) streams the same way; only what a sample decodes to differs.
        self.latents = latents_info(self.dataset)
        empty_text = read_empty_text(self.dataset, self.latents) if self.latents is not None else None
        self.cfg = _StreamConfig(shards=shards, seed=seed, batch_size=batch_size, resolution=resolution,
                                 mix_shards=mix_shards, shuffle_buffer=shuffle_buffer,
                                 holdout_fraction=holdout_fraction, latents=self.latents, empty_text=empty_text)
        self.state = state if state is not None else LoaderState()
        fitted = fit_streams([StreamState.from_dict(d) for d in self.state.streams], mine=self.stream_ids,
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
