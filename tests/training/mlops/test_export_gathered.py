"""Export at every ZeRO stage, EMA on and off: a real single-process DeepSpeed engine over the tiny
UNet is trained by the worker's own functions and saved by worker.save_and_report (Ray's report
replaced by a copy into storage), then exported and sampled. The final checkpoint carries the UNet
the workers gathered; the export must use it (or the EMA) and never consolidate optimizer shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint.layout import UNET_FILE, CheckpointError, TrainState
from training.checkpoint.verify import read_state
from training.config import load_config
from training.loader.batch import Batch
from training.loader.plan import LoaderState
from training.mlops import export as export_module
from training.models.assembly import build_components, frozen_hashes
from training.runtime.checkpointing import save_and_report
from training.runtime.context import WorkerContext
from training.runtime.engine import build_ema, build_engine
from training.tasks.ldm import LatentDiffusionTask

ROOT = Path(__file__).resolve().parents[3]
STEPS = 2


@pytest.fixture
def ray_report_copies(monkeypatch, tmp_path):
    """ray.train.report(checkpoint=...) replaced by a copy of the rank's folder into storage."""
    import pyarrow.fs
    import ray.train

    stored = []

    def report(metrics, checkpoint=None, **upload_options):
        target = tmp_path / f"checkpoint_{len(stored):06d}"
        upload = upload_options["checkpoint_upload_fn"]  # what Ray's upload runs: hash, copy, mark complete
        upload.seal(Path(checkpoint.path))
        shutil.copytree(checkpoint.path, target, dirs_exist_ok=True)
        upload.commit(pyarrow.fs.LocalFileSystem(), str(target))
        stored.append(target)
        if upload_options.get("delete_local_checkpoint_after_upload"):
            shutil.rmtree(checkpoint.path)  # as Ray does once the upload is done

    monkeypatch.setattr(ray.train, "report", report)
    return stored


def module_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's module weights as fp32, gathered here independently of the worker's gather."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def train_and_save(tmp_path: Path, stored: list, stage: int, precision: str, ema_on: bool,
                   save_steps: tuple[int, ...] = (STEPS,)):
    overrides = [f"train.zero_stage={stage}", f"train.precision={precision}", "train.allow_cpu_half_precision=true",
                 f"train.ema.enabled={str(ema_on).lower()}", f"train.max_steps={STEPS}", "train.batch_size=2",
                 "train.grad_accum=1", "train.warmup_steps=0", "train.num_workers=1"]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    ctx = WorkerContext(rank=0, world_size=1, device=torch.device("cpu"))
    parts = build_components(cfg.model, seed=cfg.train.seed)
    engine = build_engine(parts.unet, cfg.train, ctx)
    ema = build_ema(engine.module, cfg.train)
    task = LatentDiffusionTask(cfg, parts, device=ctx.device)
    generator = torch.Generator().manual_seed(0)
    state = TrainState(world_size=1, config=cfg.to_dict(), frozen=frozen_hashes(parts.vae, parts.text))
    loader = LoaderState()
    data = torch.Generator().manual_seed(1)
    while state.step < cfg.train.max_steps:
        batch = Batch(pixels=torch.randint(0, 256, (2, 3, 64, 64), generator=data, dtype=torch.uint8),
                      captions=["a red circle", "a blue square"], keys=["a", "b"])
        engine.backward(task.loss(engine, batch, generator))
        engine.step()
        if ema is not None:
            ema.step(engine.module.parameters())
        state.step += 1
        state.samples_seen += 2
        if state.step in save_steps:
            save_and_report(engine, ema, state, loader, generator, ctx, {}, cfg.train,
                            final=state.step == cfg.train.max_steps)
    return engine, ema, stored[-1]


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

    engine, ema, ckpt = train_and_save(tmp_path, ray_report_copies, stage, precision, ema_on)
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
    engine, _, ckpt = train_and_save(tmp_path, ray_report_copies, stage, "fp32", False, save_steps=(1,))
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
    _, _, ckpt = train_and_save(tmp_path, ray_report_copies, 1, "fp32", False)
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
    _, _, ckpt = train_and_save(tmp_path, ray_report_copies, stage, "fp32", stage != 3)  # EMA: not under ZeRO-3
    pickles = sorted(ckpt.rglob("*.pt"))
    assert len(pickles) >= 3  # rng, DeepSpeed model states and optimizer states
    for path in pickles:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        ours = [n for n in names if n.split(".")[0] in ("training", "data_prep", "pipelines", "__main__")]
        assert not ours, f"{path.relative_to(ckpt)} pickles {ours}"
    read_state(ckpt, verify_hashes=True)
