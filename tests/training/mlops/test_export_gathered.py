"""Export at every ZeRO stage, EMA on and off: a real DeepSpeed engine over the tiny UNet (one
process, or two gloo ranks) is trained by the worker's own functions and saved by
save_and_report (Ray's report replaced by a copy into storage), then exported and sampled. The final checkpoint carries the UNet
the workers gathered; the export must use it (or the EMA) and never consolidate optimizer shards."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.mlops.export_run import copying_report, module_weights, train_and_save
from training.checkpoint.layout import UNET_FILE, CheckpointError
from training.checkpoint.verify import read_state
from training.mlops import export as export_module

@pytest.fixture
def ray_report_copies(monkeypatch, tmp_path):
    """ray.train.report(checkpoint=...) replaced by a copy of the rank's folder into storage."""
    import ray.train

    stored = []
    monkeypatch.setattr(ray.train, "report", copying_report(tmp_path, stored))
    return stored


def no_consolidation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the export consolidated the optimizer shards")

    monkeypatch.setattr(export_module, "consolidated_weights", refuse)


CASES = [
    (0, "fp32", False), (0, "fp32", True), (0, "bf16", False),
    (1, "fp32", False), (1, "fp32", True),
    (2, "fp32", False), (2, "bf16", True),
    (3, "fp32", False), (3, "bf16", False),
]


@pytest.mark.parametrize("stage,precision,ema_on", CASES, ids=[f"zero{s}-{p}-ema_{e}" for s, p, e in CASES])
def test_trains_exports_and_generates(tmp_path, process_group, ray_report_copies, monkeypatch, caplog,
                                      stage, precision, ema_on):
    from training.models.sampling import generate_images

    engine, ema, ckpt = train_and_save(ray_report_copies, stage, precision, ema_on)
    read_state(ckpt, verify_hashes=True)
    listed = json.loads((ckpt / "files/rank-0.json").read_text())["files"]
    assert UNET_FILE in listed, "the gathered UNet must be covered by rank 0's file list"

    # Written once, in the training dtype, equal to the engine's module at the last step.
    from safetensors.torch import load_file

    gathered = load_file(str(ckpt / UNET_FILE))
    reference = module_weights(engine)
    expected_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    assert gathered.keys() == reference.keys()
    assert all(t.dtype == expected_dtype for t in gathered.values())

    no_consolidation(monkeypatch)
    with caplog.at_level("INFO", logger="training.mlops.export"):
        pipe, _ = export_module.build_pipeline(ckpt)
    exported = pipe.unet.state_dict()
    assert pipe.unet.dtype == torch.float32
    if ema_on:
        assert "from ema" in caplog.text
        shadows = [p.float() for p in ema.shadow_params]
        assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), shadows))
        # And without EMA, the same checkpoint exports the gathered raw weights.
        pipe_raw, _ = export_module.build_pipeline(ckpt, use_ema=False)
        exported = pipe_raw.unet.state_dict()
    else:
        assert "from gathered" in caplog.text
    assert all(torch.equal(exported[k], reference[k]) for k in reference)

    images = generate_images(pipe, ["a red circle on a blue background"], steps=2, guidance=3.0, seed=0)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8


@pytest.mark.parametrize("stage", [0, 2])
def test_intermediate_checkpoint_without_ema_exports(tmp_path, process_group, ray_report_copies, stage):
    """A checkpoint before the last step has no gathered file and (EMA off) no EMA: ZeRO-1-3 exports
    consolidate DeepSpeed's fp32 master weights; stage 0, which writes no optimizer shards to
    consolidate, takes its model file. Either way the weights are the engine's at that step."""
    engine, _, ckpt = train_and_save(ray_report_copies, stage, "fp32", False, save_steps=(1,))
    assert not (ckpt / UNET_FILE).exists()
    at_step_1 = {k: v.clone() for k, v in load_trained_weights(ckpt).items()}
    pipe, _ = export_module.build_pipeline(ckpt)
    exported = pipe.unet.state_dict()
    assert all(torch.isfinite(t).all() for t in exported.values())
    assert all(torch.equal(exported[k], at_step_1[k].float()) for k in exported)


def load_trained_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from training.checkpoint.loading import consolidated_weights, stage0_weights
    from training.checkpoint.verify import read_state

    state = read_state(ckpt)
    if state.config["train"]["zero_stage"] == 0:
        return stage0_weights(ckpt, state.tag)
    return consolidated_weights(ckpt, state.tag)


def test_corrupt_gathered_file_is_refused(tmp_path, process_group, ray_report_copies):
    _, _, ckpt = train_and_save(ray_report_copies, 1, "fp32", False)
    data = bytearray((ckpt / UNET_FILE).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / UNET_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=UNET_FILE):
        export_module.build_pipeline(ckpt)


@pytest.mark.parametrize("stage", [1, 3])
def test_a_checkpoint_pickles_nothing_of_this_project(tmp_path, process_group, ray_report_copies, stage):
    """A checkpoint is JSON, safetensors and tensor-only torch files: no pickled reference to a class
    or function of ldmflow, so one written before its modules moved (training/ regrouped into
    sub-packages) still loads after, as one written after loads in an older process."""
    _, _, ckpt = train_and_save(ray_report_copies, stage, "fp32", stage != 3)  # EMA: not under ZeRO-3
    pickles = sorted(ckpt.rglob("*.pt"))
    assert len(pickles) >= 3  # rng, DeepSpeed model states and optimizer states
    for path in pickles:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        ours = [n for n in names if n.split(".")[0] in ("training", "data_prep", "pipelines", "__main__")]
        assert not ours, f"{path.relative_to(ckpt)} pickles {ours}"
    read_state(ckpt, verify_hashes=True)


TWO_RANK_CASES = [(3, "bf16", False), (2, "bf16", True)]  # EMA: not under ZeRO-3


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision,ema_on", TWO_RANK_CASES,
                         ids=[f"zero{s}-{p}-ema_{e}" for s, p, e in TWO_RANK_CASES])
def test_two_ranks_export_the_consolidated_weights(tmp_path, stage, precision, ema_on):
    """On 2 gloo ranks (each its own batches), the UNet the ranks gathered into the checkpoint and
    the pipeline file the export writes from it hold the fp32 master weights that zero_to_fp32
    consolidates from both ranks' optimizer partitions in this one process, rounded to bf16; with
    EMA, the exported EMA is every rank's.

    Exact, no tolerance: DeepSpeed's bf16 optimizers copy each updated fp32 master partition into the
    bf16 parameters (round to nearest even), which is what .to(bfloat16) does; bf16 -> fp32 (the
    export UNet) is exact. A difference is a wrong weight (another rank's slice, a stale step)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tests.training.mlops.export_run import ENGINE_FILE, run_rank
    from training.checkpoint.loading import consolidated_weights, load_unet_weights

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(2, port, str(tmp_path), stage, precision, ema_on), nprocs=2, join=True)
    ckpt = tmp_path / "checkpoint_000000"
    state = read_state(ckpt, verify_hashes=True)
    assert state.world_size == 2
    assert len(list(ckpt.glob("deepspeed/*/*_rank_*_optim_states.pt"))) == 2

    master = consolidated_weights(ckpt, state.tag)  # one process, both ranks' partitions
    expected = {k: v.to(torch.bfloat16).float() for k, v in master.items()}
    gathered = load_unet_weights(ckpt)
    assert gathered.keys() == master.keys() and {t.dtype for t in gathered.values()} == {torch.bfloat16}
    assert_equal_weights(gathered, expected, "the ranks gathered")
    assert_equal_weights(load_file(str(tmp_path / ENGINE_FILE)), expected, "the engine held at the end")

    pipe, _ = export_module.build_pipeline(ckpt, use_ema=False)
    export_module.save_pipeline(pipe, tmp_path / "export")
    exported = load_file(str(tmp_path / "export/unet/diffusion_pytorch_model.safetensors"))
    assert_equal_weights(exported, expected, "the export wrote")
    if ema_on:
        shadows = [load_file(str(tmp_path / f"ema-rank-{r}.safetensors")) for r in range(2)]
        assert all(torch.equal(shadows[0][i], shadows[1][i]) for i in shadows[0]), "the ranks' EMAs differ"
        pipe, _ = export_module.build_pipeline(ckpt)
        params = list(pipe.unet.parameters())
        assert len(params) == len(shadows[1])
        assert all(torch.equal(p, shadows[1][str(i)]) for i, p in enumerate(params)), "the export's EMA is not rank 1's"


def assert_equal_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), f"the weights {what} have other names than the consolidated ones"
    differ = [k for k in expected if not torch.equal(got[k].float(), expected[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors {what} differ from the consolidated ones: {differ[:3]}"
