"""ZeRO-3 with bf16 (what the sdxl preset uses) on 2 Ray workers: parameters partitioned across
ranks (as the UNet is built: train.deepspeed.zero_init, with activation checkpointing), then
consolidated by the export into a working fp32 pipeline; the DeepSpeed config the engines ran with is
the run's deepspeed_config.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


def test_zero3_bf16_trains_and_exports(tmp_path):
    import ray

    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from training.checkpoint.loading import load_unet_weights
    from training.checkpoint.verify import read_state
    from training.config import load_config
    from training.mlops.export import build_pipeline
    from training.models.sampling import generate_images
    from training.runtime.driver import train

    generate_synthetic(tmp_path / "raw", 16, seed=2)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), samples_per_shard=4))
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "train.zero_stage=3", "train.precision=bf16", "train.allow_cpu_half_precision=true",
        "train.ema.enabled=false", "train.max_steps=3",
        "train.batch_size=4", "tracking.run_name=zero3-bf16",
        "train.deepspeed.zero_init=true", "train.deepspeed.activation_checkpointing=true",
        # Validation under ZeRO-3 runs on every rank (each forward gathers the partitions).
        "validation.holdout_fraction=0.25", "validation.every=2", "validation.max_samples=4",
        "tracking.sample_steps=2",
    ])
    try:
        outcome = train(cfg, str(tmp_path / "shards"))
    finally:
        ray.shutdown()

    ckpt = Path(outcome.checkpoint_dir)
    assert read_state(ckpt).step == 3
    # ZeRO-3 writes one parameter partition per rank.
    assert len(list(ckpt.glob("deepspeed/*/zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2
    assert_gathered_equals_consolidated(ckpt)
    assert np.isfinite(outcome.metrics["loss"])
    assert np.isfinite(outcome.metrics["val_loss"]) and outcome.metrics["val_loss"] > 0
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(outcome.run_id, "samples")}
    assert {"samples/step-000002.png", "samples/step-000003.png"} <= artifacts
    import mlflow

    from training.config.deepspeed import generated_config
    from training.mlops.tracking import DEEPSPEED_CONFIG_ARTIFACT

    logged = mlflow.artifacts.load_dict(f"{MlflowClient().get_run(outcome.run_id).info.artifact_uri}/"
                                        f"{DEEPSPEED_CONFIG_ARTIFACT}")
    assert logged == generated_config(cfg.train)
    assert logged["zero_optimization"]["stage"] == 3 and logged["bf16"]["enabled"] is True

    pipe, _ = build_pipeline(ckpt)
    assert pipe.unet.dtype == torch.float32
    # The export loads the gathered file (upcast), not some other copy of the weights.
    gathered = load_unet_weights(ckpt)
    assert all(torch.equal(v, gathered[k].float()) for k, v in pipe.unet.state_dict().items())
    images = generate_images(pipe, ["a red circle on a blue background"], steps=2, guidance=3.0, seed=0)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8


def assert_gathered_equals_consolidated(ckpt: Path) -> None:
    """The UNet the 2 ranks gathered live from the engine (unet.safetensors, bf16) is the fp32 master
    weights that zero_to_fp32 consolidates from both ranks' partitions on one process (the export's
    path for checkpoints without the gathered file), rounded to bf16.

    Exact, no tolerance: DeepSpeed's bf16 ZeRO-3 optimizer copies each updated fp32 master partition
    into the bf16 parameter partition (round to nearest even), which is what .to(bfloat16) does, so
    any difference is a wrong weight (another rank's slice, a stale step), not rounding."""
    from training.checkpoint.loading import consolidated_weights, load_unet_weights
    from training.checkpoint.verify import read_state
    from training.config import config_from_dict
    from training.models.assembly import build_components

    state = read_state(ckpt)
    gathered = load_unet_weights(ckpt)
    master = consolidated_weights(ckpt, state.tag)
    assert gathered.keys() == master.keys()
    assert {t.dtype for t in gathered.values()} == {torch.bfloat16}
    assert {t.dtype for t in master.values()} == {torch.float32}
    differ = [k for k in master if not torch.equal(gathered[k], master[k].to(torch.bfloat16))]
    assert not differ, (f"{len(differ)} of {len(master)} gathered tensors differ from the consolidated ones: "
                        f"{differ[:3]}")
    # Not vacuous: three steps moved the master weights away from the initial ones.
    initial = build_components(config_from_dict(state.config).model, seed=state.config["train"]["seed"]).unet
    moved = [k for k, v in initial.state_dict().items() if not torch.equal(v.float(), master[k])]
    assert len(moved) > len(master) // 2
