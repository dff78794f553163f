"""Checkpoint integrity and safe loading, on tiny checkpoints built by training.checkpointing's own
save functions the way the workers build them: each rank in its own folder, merged into one like
Ray's upload does. No Ray; one test runs a real single-process DeepSpeed engine."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.checkpoint.crafted import WritesMarker, check_the_payload_is_real
from training.checkpoint.layout import COMMITTED, EMA_FILE, STATE_FILE, CheckpointError, TrainState
from training.checkpoint.loading import (
    consolidated_weights,
    load_deepspeed_checkpoint,
    load_ema,
    load_rank_files,
    restore_rng,
)
from training.checkpoint.verify import read_state
from training.checkpoint.writer import mark_committed, rng_state, save_ema, save_rank_files, write_file_list

TAG = "step-00000004"
WORLD = 2


def save_rank(local: Path, rank: int, generator: torch.Generator, ema=None) -> str:
    """One rank's part, as worker.save_and_report writes it (DeepSpeed's files faked by bytes)."""
    shard = local / "deepspeed" / TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(bytes(range(256)) * (rank + 3))
    if rank == 0:
        (local / "deepspeed" / TAG / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
        (local / "deepspeed" / "latest").write_text(TAG)
    save_rank_files(local, rank, loader={"epoch": 1, "consumed": 8 * (rank + 1)}, rng=rng_state(generator))
    if ema is not None:
        save_ema(local, ema)
    return write_file_list(local, rank)


def build_checkpoint(tmp_path: Path, *, commit: bool = True, ema=None) -> Path:
    locals_ = [tmp_path / f"local-r{r}" for r in range(WORLD)]
    digests = [save_rank(locals_[r], r, torch.Generator().manual_seed(r), ema if r == 0 else None)
               for r in range(WORLD)]
    if commit:
        mark_committed(locals_[0], TrainState(step=4, samples_seen=64, world_size=WORLD, tag=TAG), digests)
    storage = tmp_path / "checkpoint_000000"
    for local in locals_:  # Ray copies each rank's folder into the same storage directory
        shutil.copytree(local, storage, dirs_exist_ok=True)
    return storage


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return build_checkpoint(tmp_path)


# --- completeness -----------------------------------------------------------------------------


def test_complete_checkpoint_verifies(ckpt: Path):
    state = read_state(ckpt, verify_hashes=True)
    assert (state.step, state.world_size, state.tag) == (4, WORLD, TAG)
    marker = json.loads((ckpt / COMMITTED).read_text())
    assert marker["world_size"] == WORLD
    assert set(marker["file_lists"]) == {"files/rank-0.json", "files/rank-1.json"}
    listed = json.loads((ckpt / "files/rank-1.json").read_text())["files"]
    assert set(listed) == {f"deepspeed/{TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt", "loader/rank-1.json",
                           "rng/rank-1.pt"}


def test_checkpoint_without_marker_is_refused(tmp_path: Path):
    ckpt = build_checkpoint(tmp_path, commit=False)
    with pytest.raises(CheckpointError, match=COMMITTED):
        read_state(ckpt)


def test_marker_before_other_ranks_upload_is_refused(tmp_path: Path):
    """Rank 0's folder (with COMMITTED) landed in storage, rank 1's did not yet."""
    build_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"files/rank-1\.json"):
        read_state(tmp_path / "local-r0")


def test_missing_rank_file_is_refused(ckpt: Path):
    (ckpt / "rng" / "rank-1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing rng/rank-1\.pt"):
        read_state(ckpt)


def test_missing_deepspeed_shard_is_refused(ckpt: Path):
    (ckpt / "deepspeed" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        read_state(ckpt)


def test_truncated_file_is_refused(ckpt: Path):
    shard = ckpt / "deepspeed" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt has \d+ bytes"):
        read_state(ckpt)


def test_changed_file_is_refused_with_hashes(ckpt: Path):
    shard = ckpt / "deepspeed" / TAG / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"MODEL" * 100)  # same size, different bytes
    read_state(ckpt)  # sizes alone cannot tell
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt does not match the sha256"):
        read_state(ckpt, verify_hashes=True)


def test_rewritten_file_list_or_state_is_refused(ckpt: Path):
    listing = ckpt / "files" / "rank-1.json"
    payload = json.loads(listing.read_text())
    del payload["files"]["rng/rank-1.pt"]
    listing.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"files/rank-1\.json does not match the sha256 in COMMITTED"):
        read_state(ckpt)
    shutil.rmtree(ckpt)
    ckpt = build_checkpoint(ckpt.parent / "again")
    state = json.loads((ckpt / STATE_FILE).read_text())
    (ckpt / STATE_FILE).write_text(json.dumps({**state, "world_size": 1}))
    with pytest.raises(CheckpointError, match="train_state.json does not match"):
        read_state(ckpt)


def test_old_format_marker_is_refused(ckpt: Path):
    (ckpt / COMMITTED).write_text("step 4\n")
    with pytest.raises(CheckpointError, match="older ldmflow"):
        read_state(ckpt)


# --- safe loading -----------------------------------------------------------------------------


def draws(generator: torch.Generator) -> tuple:
    return (torch.rand(4, generator=generator).tolist(), torch.rand(4).tolist(), np.random.rand(4).tolist(),
            np.random.randn(3).tolist(), [random.random() for _ in range(4)], random.gauss(0, 1))


def test_rng_state_round_trips_exactly(tmp_path: Path):
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    draws(generator)
    np.random.randn(1)  # leave numpy with a cached gaussian
    random.gauss(0, 1)  # and python with gauss_next set
    save_rank_files(tmp_path, 0, loader={"epoch": 0, "consumed": 0}, rng=rng_state(generator))
    expected = draws(generator)

    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    other = torch.Generator().manual_seed(99)
    _, rng = load_rank_files(tmp_path, 0)
    restore_rng(rng, other)
    assert draws(other) == expected
    # Loadable without unpickling arbitrary objects.
    torch.load(tmp_path / "rng" / "rank-0.pt", weights_only=True)


def test_crafted_pickle_in_rng_file_is_refused_and_not_run(ckpt: Path, tmp_path: Path):
    check_the_payload_is_real(tmp_path, "generator")  # the unsafe load (weights_only=False) runs it

    marker = tmp_path / "pwned-marker"
    torch.save({"generator": WritesMarker(marker), "torch": torch.get_rng_state(), "numpy": {}, "python": {}},
               ckpt / "rng" / "rank-1.pt")
    with pytest.raises(CheckpointError, match=r"rng/rank-1\.pt"):
        load_rank_files(ckpt, 1)
    with pytest.raises(CheckpointError, match=r"rng/rank-1\.pt"):
        read_state(ckpt, verify_hashes=True)
    assert not marker.exists()


def test_ema_round_trips_through_safetensors(tmp_path: Path):
    from diffusers.training_utils import EMAModel

    module = torch.nn.Linear(3, 2)
    ema = EMAModel([p.detach().float() for p in module.parameters()], decay=0.9, use_ema_warmup=False)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    ema.step(module.parameters())
    ckpt = build_checkpoint(tmp_path, ema=ema)
    assert (ckpt / EMA_FILE).is_file()
    assert EMA_FILE in json.loads((ckpt / "files/rank-0.json").read_text())["files"]
    read_state(ckpt, verify_hashes=True)

    restored = EMAModel([torch.zeros_like(p) for p in module.parameters()], decay=0.5)
    load_ema(ckpt, restored)
    assert restored.state_dict().keys() == ema.state_dict().keys()
    assert (restored.decay, restored.optimization_step) == (0.9, ema.optimization_step)
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow_params, ema.shadow_params))


# --- DeepSpeed's own files, loaded with weights_only=True --------------------------------------


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (3, "bf16")])
def test_deepspeed_checkpoint_loads_without_unsafe_unpickling(tmp_path: Path, process_group, monkeypatch,
                                                              stage, precision):
    import deepspeed

    def engine():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        return deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config,
                                    dist_init_required=False)[0]

    trained = engine()
    dtype = next(trained.module.parameters()).dtype
    for _ in range(2):
        trained.backward(trained(torch.randn(2, 4, dtype=dtype)).float().pow(2).sum())
        trained.step()
    local = tmp_path / "local"
    trained.save_checkpoint(str(local / "deepspeed"), tag=TAG)
    save_rank_files(local, 0, loader={"epoch": 0, "consumed": 4}, rng=rng_state(torch.Generator()))
    mark_committed(local, TrainState(step=2, world_size=1, tag=TAG), [write_file_list(local, 0)])
    read_state(local, verify_hashes=True)

    # Any torch.load that asks for weights_only=False would fail this test.
    real_load = torch.load

    def strict_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"unsafe torch.load{args}"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", strict_load)
    fresh = engine()
    load_deepspeed_checkpoint(fresh, local, TAG)
    assert fresh.global_steps == trained.global_steps == 2
    weights = consolidated_weights(local, TAG)
    reference = {k: v.float() for k, v in trained.module.state_dict().items()}
    if stage == 3:  # ZeRO-3 keeps parameters partitioned; zero_to_fp32 gathers them
        assert weights.keys() == reference.keys()
    else:
        assert all(torch.allclose(weights[k], reference[k]) for k in reference)
        assert all(torch.equal(a, b) for a, b in zip(fresh.module.parameters(), trained.module.parameters()))


@pytest.mark.parametrize("tag", ["/tmp/elsewhere", "../../elsewhere"])
def test_a_tag_that_leaves_the_checkpoint_is_refused(tmp_path: Path, tag: str):
    """DeepSpeed loads deepspeed/<tag>/ (an absolute tag replaces the folder) and the elastic path
    converts it: the tag from train_state.json must be one plain name, however consistent the rest."""
    local = tmp_path / "ckpt"
    save_rank_files(local, 0, loader={"epoch": 0, "consumed": 0}, rng=rng_state(torch.Generator()))
    # Where pathlib puts deepspeed/<tag>/...: for "/tmp/elsewhere", deepspeed/tmp/elsewhere/ inside.
    shard = local / "deepspeed" / tag.lstrip("/") / "mp_rank_00_model_states.pt"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"model")
    # A crafted list naming the shard under the tag, as a writer of the tag would.
    import hashlib

    listed = {rel: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
              for rel, p in (("loader/rank-0.json", local / "loader/rank-0.json"),
                             ("rng/rank-0.pt", local / "rng/rank-0.pt"),
                             (f"deepspeed/{tag}/mp_rank_00_model_states.pt", shard))}
    (local / "files").mkdir()
    (local / "files/rank-0.json").write_text(json.dumps({"rank": 0, "files": listed}))
    digest = hashlib.sha256((local / "files/rank-0.json").read_bytes()).hexdigest()
    mark_committed(local, TrainState(step=1, world_size=1, tag=tag), [digest])
    with pytest.raises(CheckpointError, match="`tag` must be one plain name"):
        read_state(local, verify_hashes=True)
