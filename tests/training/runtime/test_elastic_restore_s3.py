"""A resume on another number of workers, from S3: the group's rank 0 converts the checkpoint into a
universal one once and stores it in the checkpoint, the other rank waits for it, and each fetches only
the files its engine loads. Counted in bytes each rank read from the real S3 server (SeaweedFS); a
second resume reuses the stored conversion.

Real DeepSpeed (ZeRO-2, fp32), no Ray: a 1-rank checkpoint written by this process, resumed by 2
spawned processes over gloo, each running the worker's own fetch_verified and universal_copy."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from data_prep import storage
from tests.training.checkpoint.test_elastic_resume import (
    ROOT,
    STEPS,
    TAG,
    assert_same_state,
    batch_for,
    build,
    full_state,
    train_step,
)
from training.checkpoint.elastic import UNIVERSAL_CLIENT_STATE
from training.checkpoint.layout import TrainState
from training.checkpoint.loading import safe_torch_load
from training.checkpoint.writer import mark_committed, rng_state, save_rank_files, write_file_list

pytestmark = pytest.mark.slow


def resume_rank(rank: int, port: int, uri: str, out: str) -> None:
    """One of the 2 resuming ranks: fetch, convert or wait, load; write what it read and loaded."""
    import torch.distributed as dist

    from training.checkpoint.elastic import load_universal_checkpoint
    from training.runtime.context import WorkerContext
    from training.runtime.restore_point import fetch_verified, universal_copy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    engine = build(2, "fp32", rank=rank, world_size=2, universal=True)
    ctx = WorkerContext(rank=rank, world_size=2, device=torch.device("cpu"))
    began = storage.s3_bytes_read()
    with tempfile.TemporaryDirectory() as tmp:
        restore_point = fetch_verified(uri, Path(tmp) / "checkpoint", ctx)
        folder, tag = universal_copy(restore_point, engine, ctx, Path(tmp) / "universal")
        fetched = sorted(p.relative_to(folder / tag).as_posix() for p in (folder / tag).rglob("*") if p.is_file())
        load_universal_checkpoint(engine, folder, tag)
    read = storage.s3_bytes_read() - began
    loaded = full_state(engine)  # a collective: both ranks
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"read": read, "fetched": fetched}))
    if rank == 0:
        torch.save({"loaded": loaded, "steps": engine.global_steps}, Path(out, "loaded.pt"))
    dist.destroy_process_group()


def resume_on_two(uri: str, out: Path) -> dict[int, dict]:
    import torch.multiprocessing as mp

    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT))
        mp.spawn(resume_rank, args=(port, uri, str(out)), nprocs=2, join=True)
    return {r: json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)}


def one_rank_checkpoint(local: Path, uri: str) -> dict:
    """A committed 1-rank ZeRO-2 checkpoint in the project's layout, uploaded to `uri`; its state."""
    engine = build(2, "fp32", rank=0, world_size=1)
    for step in range(STEPS):
        train_step(engine, batch_for(step, 0, 1))
    engine.save_checkpoint(str(local / "deepspeed"), tag=TAG, client_state=UNIVERSAL_CLIENT_STATE)
    save_rank_files(local, 0, loader={"epoch": 0, "consumed": 8}, rng=rng_state(torch.Generator()))
    mark_committed(local, TrainState(step=STEPS, world_size=1, tag=TAG), [write_file_list(local, 0)])
    store = storage.storage_for(uri)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.put_file(str(path), storage.join(uri, path.relative_to(local).as_posix()))
    return full_state(engine)


def test_conversion_runs_once_and_each_rank_reads_its_part(tmp_path, s3_bucket, process_group):
    uri = f"s3://{s3_bucket}/run/checkpoint_2026-01-01_00-00-00.000000"
    saved = one_rank_checkpoint(tmp_path / "local", uri)
    objects = {o.name: o.size for o in storage.storage_for(uri).list(uri)}
    partitions = sum(size for name, size in objects.items() if name.startswith(f"deepspeed/{TAG}/"))

    first = resume_on_two(uri, tmp_path / "first")
    assert_same_state(safe_torch_load(tmp_path / "first" / "loaded.pt")["loaded"], saved)
    stored = {o.name: o.size for o in storage.storage_for(uri).list(f"{uri}/universal")}
    assert "COMMITTED" in stored and "FAILED" not in stored
    universal = sum(size for name, size in stored.items() if name != "COMMITTED")
    params = {name.split("/")[2] for name in stored if name.count("/") == 3 and "/zero/" in name}
    for rank, seen in first.items():
        print(f"first resume: rank {rank} read {seen['read']} bytes (partitions {partitions}, universal {universal})")
    # Rank 0 read every partition once to convert (and loads what it made); rank 1 none of them, only
    # its part of the conversion.
    assert partitions < first[0]["read"] < partitions + 100_000
    assert first[1]["read"] < universal and first[1]["read"] < partitions
    assert 0 < len(loaded_params(first[1])) < len(params)

    again = resume_on_two(uri, tmp_path / "again")  # the stored conversion is reused: no rank converts
    assert_same_state(safe_torch_load(tmp_path / "again" / "loaded.pt")["loaded"], saved)
    assert {o.name: o.size for o in storage.storage_for(uri).list(f"{uri}/universal")} == stored
    for rank, seen in again.items():
        print(f"second resume: rank {rank} read {seen['read']} bytes")
        assert seen["read"] < universal and seen["read"] < partitions
        assert 0 < len(loaded_params(seen)) < len(params)
    assert loaded_params(again[0]) | loaded_params(again[1]) == params


def loaded_params(seen: dict) -> set[str]:
    """The parameters whose universal files (zero/<name>/<state>.pt) a rank fetched."""
    return {rel.split("/")[1] for rel in seen["fetched"] if rel.count("/") == 2}
