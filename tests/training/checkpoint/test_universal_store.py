"""The stored universal conversion: trusted only when complete and made from this checkpoint; a rank
waiting for it stops at once when the converting rank failed, and after a bounded wait otherwise.

The conversion converts a ZeRO-0 model-states file (DeepSpeed's converter copies it: the stage-0
path of training.checkpoint.elastic), so no engine is needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint.layout import COMMITTED, CheckpointError
from training.checkpoint.universal_store import (
    FAILED,
    fetch_conversion,
    publish_conversion,
    stored_conversion,
    wait_for_conversion,
)

TAG = "step-00000004"
MODEL = f"{TAG}_universal/mp_rank_00_model_states.pt"


def checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "checkpoint_2026-01-01_00-00-00.000000"
    (ckpt / "deepspeed" / TAG).mkdir(parents=True)
    torch.save({"dp_world_size": 1, "module": {"w": torch.arange(64.0)}},
               ckpt / "deepspeed" / TAG / "mp_rank_00_model_states.pt")
    (ckpt / COMMITTED).write_text(json.dumps({"step": 4, "tag": TAG}))
    return ckpt


def publish(tmp_path: Path, ckpt: Path):
    return publish_conversion(str(ckpt), ckpt / "deepspeed", TAG, tmp_path / "scratch", "attempt-1")


def test_a_complete_conversion_is_found_and_fetched(tmp_path):
    ckpt = checkpoint(tmp_path)
    assert stored_conversion(str(ckpt)) is None
    made = publish(tmp_path, ckpt)
    found = stored_conversion(str(ckpt))
    assert found == made and found.tag == f"{TAG}_universal" and MODEL in found.files
    folder = fetch_conversion(found, tmp_path / "fetched", needed=lambda rel: True)
    assert torch.load(folder / MODEL, weights_only=True)["module"]["w"].sum() == sum(range(64))


def test_a_partial_or_stale_conversion_is_not_taken_for_complete(tmp_path):
    ckpt = checkpoint(tmp_path)
    publish(tmp_path, ckpt)
    universal = ckpt / "universal"

    (universal / MODEL).write_bytes(b"cut")  # a file not (fully) there: another size than listed
    assert stored_conversion(str(ckpt)) is None

    publish(tmp_path, ckpt)
    (universal / COMMITTED).unlink()  # killed before its marker
    assert stored_conversion(str(ckpt)) is None

    publish(tmp_path, ckpt)
    (ckpt / COMMITTED).write_text(json.dumps({"step": 4, "tag": TAG, "rewritten": True}))
    assert stored_conversion(str(ckpt)) is None  # made from another state of the checkpoint


def test_a_fetched_file_is_checked_against_its_sha256(tmp_path):
    ckpt = checkpoint(tmp_path)
    conversion = publish(tmp_path, ckpt)
    data = bytearray((ckpt / "universal" / MODEL).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / "universal" / MODEL).write_bytes(bytes(data))  # same size: only the hash sees it
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        fetch_conversion(conversion, tmp_path / "fetched", needed=lambda rel: True)


def test_a_failed_conversion_stops_the_waiting_ranks_at_once(tmp_path):
    ckpt = checkpoint(tmp_path)
    (ckpt / "deepspeed" / TAG / "mp_rank_00_model_states.pt").unlink()  # nothing to convert
    with pytest.raises(CheckpointError, match="no DeepSpeed model states"):
        publish(tmp_path, ckpt)
    assert not (ckpt / "universal" / COMMITTED).exists()
    with pytest.raises(CheckpointError, match="rank 0 could not convert .*no DeepSpeed model states"):
        wait_for_conversion(str(ckpt), "attempt-1", rank=1, timeout_s=60)


def test_the_wait_is_bounded(tmp_path):
    ckpt = checkpoint(tmp_path)
    (ckpt / "universal").mkdir()
    (ckpt / "universal" / FAILED).write_text(json.dumps({"attempt": "an-earlier-one", "error": "old"}))
    with pytest.raises(CheckpointError, match="rank 1 waited 0 s for rank 0 to convert"):
        wait_for_conversion(str(ckpt), "attempt-2", rank=1, timeout_s=0.2, poll_s=0.05)
