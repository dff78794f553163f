"""The worker's own training and checkpoint functions driven without Ray, on one rank or on several
gloo ranks (processes spawned by the test): ray.train.report is replaced by a copy of the rank's
folder into storage, as Ray merges every rank's folder into one checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.fs
import torch

from training.checkpoint.layout import TrainState
from training.config import load_config
from training.loader.batch import Batch
from training.loader.plan import LoaderState
from training.models.assembly import build_components, frozen_hashes
from training.runtime.checkpointing import save_and_report
from training.runtime.context import WorkerContext
from training.runtime.engine import build_ema, build_engine
from training.tasks.ldm import LatentDiffusionTask

ROOT = Path(__file__).resolve().parents[3]
STEPS = 2
ENGINE_FILE = "engine-weights.safetensors"
"""What rank 0 of a multi-rank run writes beside the checkpoint: the module gathered at the end."""


def copying_report(storage: Path, stored: list):
    """A ray.train.report that copies the rank's folder into storage/checkpoint_<n> (every rank
    into the same folder for the same report) and appends that folder to `stored`."""

    def report(metrics, checkpoint=None, **upload_options):
        target = storage / f"checkpoint_{len(stored):06d}"
        upload = upload_options["checkpoint_upload_fn"]  # what Ray's upload runs: hash, copy, mark complete
        upload.seal(Path(checkpoint.path))
        shutil.copytree(checkpoint.path, target, dirs_exist_ok=True)
        if upload.rank == 0:  # as CommittingUpload.__call__: rank 0 marks the checkpoint complete
            upload.commit(pyarrow.fs.LocalFileSystem(), str(target))
        stored.append(target)
        if upload_options.get("delete_local_checkpoint_after_upload"):
            shutil.rmtree(checkpoint.path)  # as Ray does once the upload is done

    return report


def module_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's module weights as fp32, gathered here independently of the worker's gather (a
    collective under ZeRO-3: every rank calls it)."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def train_and_save(stored: list, stage: int, precision: str, ema_on: bool,
                   save_steps: tuple[int, ...] = (STEPS,), ctx: WorkerContext | None = None):
    """STEPS steps of the tiny UNet on random batches (each rank its own), saved at `save_steps`;
    returns the engine, the EMA and the last checkpoint folder."""
    ctx = ctx or WorkerContext(rank=0, world_size=1, device=torch.device("cpu"))
    overrides = [f"train.zero_stage={stage}", f"train.precision={precision}", "train.allow_cpu_half_precision=true",
                 f"train.ema.enabled={str(ema_on).lower()}", f"train.max_steps={STEPS}", "train.batch_size=2",
                 "train.grad_accum=1", "train.warmup_steps=0", "train.num_workers=1"]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    parts = build_components(cfg.model, seed=cfg.train.seed)
    engine = build_engine(parts.unet, cfg.train, ctx)
    ema = build_ema(engine.module, cfg.train)
    task = LatentDiffusionTask(cfg, parts, device=ctx.device)
    generator = torch.Generator().manual_seed(ctx.rank)
    state = TrainState(world_size=ctx.world_size, config=cfg.to_dict(), frozen=frozen_hashes(parts.vae, parts.text))
    loader = LoaderState()
    data = torch.Generator().manual_seed(1 + ctx.rank)
    while state.step < cfg.train.max_steps:
        batch = Batch(pixels=torch.randint(0, 256, (2, 3, 64, 64), generator=data, dtype=torch.uint8),
                      captions=["a red circle", "a blue square"], keys=["a", "b"])
        engine.backward(task.loss(engine, batch, generator))
        engine.step()
        if ema is not None:
            ema.step(engine.module.parameters())
        state.step += 1
        state.samples_seen += 2 * ctx.world_size
        if state.step in save_steps:
            save_and_report(engine, ema, state, loader, generator, ctx, {}, cfg.train,
                            final=state.step == cfg.train.max_steps)
    return engine, ema, stored[-1]


def run_rank(rank: int, world_size: int, port: int, storage: str, stage: int, precision: str, ema_on: bool) -> None:
    """One gloo rank of a multi-rank run (torch.multiprocessing.spawn's target): trains, saves the
    final checkpoint into `storage`, then writes what the test compares the export with: the module
    gathered independently (rank 0) and each rank's EMA shadows."""
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # the ranks share the machine's cores
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        stored: list = []
        ray.train.report = copying_report(Path(storage), stored)
        ctx = WorkerContext(rank=rank, world_size=world_size, device=torch.device("cpu"))
        engine, ema, _ = train_and_save(stored, stage, precision, ema_on, ctx=ctx)
        weights = module_weights(engine)
        if rank == 0:
            save_file(weights, str(Path(storage) / ENGINE_FILE))
        if ema is not None:
            save_file({str(i): p.contiguous() for i, p in enumerate(ema.shadow_params)},
                      str(Path(storage) / f"ema-rank-{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
