"""The whole chain as one Prefect flow on the embedded default, then the registered model consumed
from a fresh process: synth -> shards -> VAE, then LDM, each on Ray (2 workers) + DeepSpeed ZeRO-2
-> MLflow -> evaluate and generate. The demo's presets (shapes-vae, shapes), a few steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(scope="module")
def flow_result(prefect_server, local_ray, tmp_path_factory):
    from pipelines.flows import run_pipeline

    work = tmp_path_factory.mktemp("flow")
    # A bare preset name, from a folder that is not the project's: the tasks get the resolved config.
    cwd = os.getcwd()
    os.chdir(work)
    try:
        # The demo presets train on one 2-core worker; two 1-core workers here keep the flow's
        # multi-rank path (ZeRO-2 all-reduce, per-rank loader state, a 2-rank checkpoint) under test.
        small = ["train.batch_size=8", "train.num_workers=2", "train.cpus_per_worker=1",
                 "validation.holdout_fraction=0.1", "validation.max_samples=4"]
        summary = run_pipeline(
            config_path="shapes",
            overrides=[*small, f"train.max_steps={STEPS}", "train.log_every=2", "train.checkpoint_every=2",
                       "train.checkpoints_to_keep=2", "tracking.model_name=ldm-e2e", "tracking.sample_steps=2",
                       "validation.every=3", "gate.prompts=2", "gate.per_prompt=1", "gate.steps=2",
                       "gate.first_floor=0", "gate.floor=0"],
            vae_config_path="shapes-vae", vae_overrides=[*small, "train.max_steps=4", "train.log_every=2"],
            synth_n=48, work_dir=str(work), samples_per_shard=8, overwrite_shards=False,
        )
    finally:
        os.chdir(cwd)
    return summary, work


@pytest.fixture(scope="module")
def mlflow_client(flow_result):
    from mlflow import MlflowClient

    from training.locations import setup_mlflow

    setup_mlflow()
    return MlflowClient()


def test_flow_run_completed_on_prefect_server(flow_result):
    import anyio
    from prefect.client.orchestration import get_client

    summary, _ = flow_result
    assert summary["state"] == "COMPLETED", summary.get("message")

    async def read_state():
        async with get_client() as client:
            run = await client.read_flow_run(summary["flow_run_id"])
            return run.state.type.value, run.name

    state, _ = anyio.run(read_state)
    assert state == "COMPLETED"


def test_shards_match_their_manifest(flow_result):
    from data_prep.dataset import read_dataset, verify_dataset

    summary, work = flow_result
    shards = work / "shards"
    report = verify_dataset(str(shards))
    assert report.ok and not report.orphans, (report.problems, report.orphans)
    dataset = read_dataset(str(shards))
    assert dataset.total_samples == 48 and len(dataset.parts) == 1 and dataset.resolution == 32
    assert all(s.samples <= 8 for s in dataset.shards) and sum(s.samples for s in dataset.shards) == 48
    assert summary["shards"]["content_id"] == dataset.content_id
    assert not list(shards.rglob(".*tmp*"))


def test_shard_report_is_a_prefect_artifact(flow_result):
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary, _ = flow_result

    async def read():
        async with get_client() as client:
            key = ArtifactFilterKey(any_=["shard-report"])
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=key))

    artifacts = anyio.run(read)
    assert artifacts and artifacts[-1].type == "markdown"
    text = artifacts[-1].data
    assert "| written | 48 samples in" in text and summary["shards"]["content_id"][:16] in text


def test_mlflow_run_has_config_metrics_and_samples(flow_result, mlflow_client):
    summary, _ = flow_result
    run = mlflow_client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.zero_stage"] == "2" and params["train.num_workers"] == "2"
    assert params["train.max_steps"] == str(STEPS)
    assert run.data.tags["dataset_content_id"] == summary["shards"]["content_id"]
    assert len(run.data.tags["config_hash"]) == 64
    assert len(run.data.tags["git_commit"]) == 40 and int(run.data.tags["git_commit"], 16) >= 0
    # The Prefect flow run that trained it, as Prefect's own server knows it.
    import anyio
    from prefect.client.orchestration import get_client

    async def flow_name(flow_run_id):
        async with get_client() as client:
            flow_run = await client.read_flow_run(flow_run_id)
            return (await client.read_flow(flow_run.flow_id)).name

    assert anyio.run(flow_name, run.data.tags["prefect_flow_run_id"]) == "ldm-train-pipeline"
    # The dataset as an MLflow dataset input, its digest the shards' content id.
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == summary["shards"]["content_id"][:36]
    for name in ("loss", "lr", "samples_per_sec"):
        history = mlflow_client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [2, 4, 6], name
        assert all(m.value > 0 for m in history)
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "samples")}
    # The final grid of the export, and the validation grids of steps 3 and 6 (validation.every=3).
    assert {"samples/final.png", "samples/step-000003.png", "samples/step-000006.png"} <= artifacts
    for name in ("val_loss", "val_loss_t100", "val_loss_t900"):
        history = mlflow_client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [3, 6] and all(m.value > 0 for m in history), name


def test_the_vae_stage_trains_exports_and_feeds_the_ldm(flow_result, mlflow_client):
    from diffusers import AutoencoderKL

    summary, _ = flow_result
    vae = summary["vae"]
    run = mlflow_client.get_run(vae["run_id"])
    assert run.data.tags["task"] == "vae" and run.data.params["train.max_steps"] == "4"
    assert sorted(m.step for m in mlflow_client.get_metric_history(vae["run_id"], "val_psnr")) == [4]
    assert run.data.metrics["export_val_psnr"] == pytest.approx(vae["psnr"])
    # The scaling factor is the data's (1 / std of the latents), saved into the VAE's config.
    loaded = AutoencoderKL.from_pretrained(vae["path"])
    assert loaded.config.scaling_factor == pytest.approx(vae["scaling_factor"]) != 0.18215
    assert {a.path for a in mlflow_client.list_artifacts(vae["run_id"], "vae")} >= {"vae/config.json"}
    # The LDM trained on exactly that VAE, and exported it.
    ldm = mlflow_client.get_run(summary["run_id"])
    assert ldm.data.params["model.vae.pretrained"] == vae["path"]
    from training.locations import runs_dir

    exported = AutoencoderKL.from_pretrained(runs_dir() / "exports" / summary["run_id"] / "pipeline" / "vae")
    assert exported.config.scaling_factor == pytest.approx(vae["scaling_factor"])


def test_evaluate_scores_the_registered_model_and_records_it(flow_result, mlflow_client, tmp_path):
    from training.eval.evaluate import run_evaluation

    summary, _ = flow_result
    evaluation = run_evaluation("models:/ldm-e2e@candidate", prompts=2, per_prompt=2, steps=2, out_dir=tmp_path)
    assert evaluation.grid_path.is_file() and len(evaluation.images) == 8  # 2 held-out and 2 seen prompts x 2
    metrics = mlflow_client.get_run(summary["run_id"]).data.metrics
    for key in ("colour_adherence", "shape_adherence", "background_adherence"):
        assert 0.0 <= metrics[f"eval_{key}"] <= 1.0
    # The held-out loss at fixed timesteps, recomputed from the registered model: what training
    # logged at its final step (the same EMA weights, samples, timesteps and noise).
    logged = [m for m in mlflow_client.get_metric_history(summary["run_id"], "val_loss") if m.step == STEPS]
    assert metrics["eval_val_loss"] == pytest.approx(logged[0].value, rel=1e-3)
    tags = mlflow_client.get_model_version("ldm-e2e", summary["model"]["version"]).tags
    assert float(tags["eval.shape_adherence"]) == pytest.approx(metrics["eval_shape_adherence"], abs=1e-4)


def test_checkpoints_are_committed_and_pruned(flow_result, mlflow_client):
    from training.checkpoint.verify import read_state

    summary, _ = flow_result
    ckpt = Path(mlflow_client.get_run(summary["run_id"]).data.tags["checkpoint"])
    state = read_state(ckpt)  # raises unless COMMITTED and every rank's files are there
    assert state.step == STEPS and state.world_size == 2
    assert state.samples_seen == STEPS * 8 * 2
    kept = sorted(p for p in ckpt.parent.glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2 and ckpt in kept
    loaders = [json.loads((ckpt / "loader" / f"rank-{r}.json").read_text()) for r in range(2)]
    # Equal positions: each rank handed out one batch per step, none ran ahead.
    assert [sum(s["batches"] for s in loader["streams"]) for loader in loaders] == [STEPS, STEPS]


def test_registered_version_has_alias_and_tags(flow_result, mlflow_client):
    summary, _ = flow_result
    mv = mlflow_client.get_model_version_by_alias("ldm-e2e", "candidate")
    assert str(mv.version) == summary["model"]["version"]
    assert mv.run_id == summary["run_id"]
    assert mv.status == "READY"
    assert mv.tags["dataset_content_id"] == summary["shards"]["content_id"]
    assert {"git_commit", "config_hash", "metric.loss"} <= set(mv.tags)


def test_the_gate_made_the_first_version_champion(flow_result, mlflow_client):
    summary, _ = flow_result
    gate = summary["model"]["gate"]
    assert gate["promoted"] and gate["champion_version"] is None and "first version" in gate["reason"]
    mv = mlflow_client.get_model_version_by_alias("ldm-e2e", "champion")
    assert str(mv.version) == summary["model"]["version"]
    assert mv.tags["gate.decision"] == "promoted" and mv.tags["champion.action"] == "gate"
    assert float(mv.tags["gate.shape_adherence"]) == gate["candidate"]["shape_adherence"]


def test_publishing_again_does_not_create_a_version(flow_result, mlflow_client):
    from training.locations import runs_dir
    from training.mlops.registry import register_pipeline

    summary, _ = flow_result
    before = mlflow_client.search_model_versions("name='ldm-e2e'")
    pipeline = runs_dir() / "exports" / summary["run_id"] / "pipeline"
    again = register_pipeline(summary["run_id"], pipeline, "ldm-e2e", {"retried": "yes"})
    after = mlflow_client.search_model_versions("name='ldm-e2e'")
    assert again.version == summary["model"]["version"]
    assert len(after) == len(before) == 1
    assert mlflow_client.get_model_version("ldm-e2e", again.version).tags["retried"] == "yes"


def test_exported_folder_is_a_diffusers_pipeline(flow_result):
    from training.locations import runs_dir

    summary, _ = flow_result
    folder = runs_dir() / "exports" / summary["run_id"] / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()


def test_generate_from_registry_in_a_fresh_process(flow_result, tmp_path):
    from training.locations import tracking_uri

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    out = tmp_path / "images"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "generate", "--model", "models:/ldm-e2e@candidate",
         "--prompt", "a red circle on a blue background", "--out", str(out), "--n", "2", "--steps", "3",
         "--seed", "5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["image-00005.png", "image-00006.png"]
    for f in files:
        with Image.open(f) as im:
            assert im.size == (32, 32) and im.mode == "RGB"


def test_published_model_has_limits_an_example_and_its_final_checkpoint_on_the_run(flow_result, mlflow_client):
    """publish records the config's `serving` limits in the model, logs an input example, and logs the
    final checkpoint's model files to the run (issue 13)."""
    import mlflow

    from training.mlops.checkpoint_artifacts import ARTIFACTS_TAG, STEP_TAG
    from training.models.sampling import LIMITS_FILE, RequestLimits

    summary, _ = flow_result
    tags = mlflow_client.get_run(summary["run_id"]).data.tags
    assert tags[STEP_TAG] == str(STEPS) and tags[ARTIFACTS_TAG] == f"runs:/{summary['run_id']}/checkpoints/step-{STEPS}"
    logged = {a.path for a in mlflow_client.list_artifacts(summary["run_id"], f"checkpoints/step-{STEPS}")}
    assert {f"checkpoints/step-{STEPS}/{name}" for name in ("unet.safetensors", "ema.safetensors",
                                                           "train_state.json", "COMMITTED")} <= logged
    model = mlflow.models.get_model_info("models:/ldm-e2e@candidate")
    assert model.saved_input_example_info is not None
    limits = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"models:/ldm-e2e@candidate/artifacts/pipeline/{LIMITS_FILE}")).read_text())
    assert RequestLimits(**limits) == RequestLimits(max_image_size=None)  # the config's defaults
