"""The retrain flow on Prefect's local server with the embedded MLflow store and a local Ray: the
first run shards, trains from scratch and makes v1 champion; the same training asked again is a cache
hit; a second run with nothing new trains nothing; new images (named like the old ones) are sharded
as a new part and fine-tuned from the champion into v2, while a second retrain of the same model,
started during it, is refused without training. Tiny preset, 1 worker, 4 steps."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from tests.pipelines.prefect_fixtures import artifact_text, task_runs

pytestmark = pytest.mark.slow

MODEL = "ldm-retrain-test"
OVERRIDES = ["train.max_steps=4", "train.num_workers=1", "train.batch_size=4", "train.log_every=2",
             "train.checkpoint_every=4", "validation.every=4", "validation.max_samples=4",
             "tracking.sample_steps=2", f"tracking.model_name={MODEL}", "gate.prompts=1", "gate.per_prompt=1",
             "gate.steps=2", "gate.first_floor=0", "gate.floor=0", "gate.margin=0"]
QUICK = {"config": "tiny", "overrides": OVERRIDES, "eval_prompts": 1, "eval_per_prompt": 1, "eval_steps": 2}


@pytest.fixture(scope="module")
def world(prefect_server, local_ray, tmp_path_factory):
    from mlflow import MlflowClient

    from data_prep.synth import generate_synthetic
    from training.locations import setup_mlflow

    root = tmp_path_factory.mktemp("retrain")
    generate_synthetic(str(root / "batch1"), 24, seed=0, image_size=64)
    # The second batch's files are named exactly like the first's: new by content, not by name.
    generate_synthetic(str(root / "batch2"), 12, seed=1, image_size=64)
    setup_mlflow()
    return root, MlflowClient()


def ldm_runs(client) -> list:
    experiment = client.get_experiment_by_name("ldmflow")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string="tags.task = 'ldm'")


def task_names(state) -> list[str]:
    return sorted(t.name.rsplit("-", 1)[0] for t in task_runs(state.state_details.flow_run_id))


@pytest.fixture(scope="module")
def first(world):
    from pipelines.flows import retrain_flow

    root, _ = world
    started = time.monotonic()
    state = retrain_flow(source=str(root / "batch1"), dataset=str(root / "dataset"), **QUICK, return_state=True)
    print(f"first retrain: {time.monotonic() - started:.0f} s")
    assert state.is_completed(), state.message
    return state, state.result()


def test_first_retrain_shards_trains_from_scratch_and_promotes(world, first):
    from data_prep.dataset import read_dataset

    root, client = world
    state, result = first
    assert result["trained"] and result["init"] is None
    assert result["shards"]["written"] == 24 and result["shards"]["samples"] == 24
    assert result["model"]["version"] == "1" and result["model"]["gate"]["promoted"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1" and champion.run_id == result["run_id"]
    assert champion.tags["dataset_content_id"] == read_dataset(str(root / "dataset")).content_id
    assert 0.0 <= result["evaluation"]["metrics"]["shape_adherence"] <= 1.0
    report = artifact_text(state.state_details.flow_run_id, "ldm-retrain-report")
    assert f"| registered | {MODEL} v1 (alias candidate) |" in report and "| samples written | 24 |" in report
    assert f"`runs:/{result['run_id']}`" in report and f"`models:/{MODEL}/1`" in report
    assert "| initialised from | scratch |" in report and "promoted to champion" in report


def test_the_same_training_again_is_a_cache_hit(world, first):
    """train_flow with the retrain's config on the same dataset: the train task is Cached and returns
    the first run; no MLflow run is started."""
    from pipelines.flows import train_flow

    root, client = world
    _, result = first
    before = len(ldm_runs(client))
    state = train_flow(data=str(root / "dataset"), config="tiny", overrides=OVERRIDES, return_state=True)
    assert state.is_completed(), state.message
    trains = [t for t in task_runs(state.state_details.flow_run_id) if t.name.startswith("train_task")]
    assert [t.state.name for t in trains] == ["Cached"]
    assert state.result()["run_id"] == result["run_id"] and state.result()["model"]["version"] == "1"
    assert len(ldm_runs(client)) == before


def test_nothing_new_trains_nothing(world, first):
    from pipelines.flows import retrain_flow

    root, client = world
    before = len(ldm_runs(client))
    state = retrain_flow(source=str(root / "batch1"), dataset=str(root / "dataset"), **QUICK, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert not result["trained"] and result["champion"] == "1" and "nothing new" in result["reason"]
    assert result["shards"]["written"] == 0 and result["shards"]["existing"] == 24
    assert task_names(state) == ["champion_task", "shard_task"]  # no train, register, evaluate or gate task
    assert len(ldm_runs(client)) == before
    assert "nothing trained" in artifact_text(state.state_details.flow_run_id, "ldm-retrain-report")


def _active_slots(name: str) -> int:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return (await client.read_global_concurrency_limit_by_name(name)).active_slots

    return anyio.run(read)


def test_new_data_fine_tunes_the_champion_and_a_second_retrain_is_refused(world, first):
    from data_prep.dataset import read_dataset
    from pipelines.flows import retrain_flow
    from pipelines.retrain_lock import limit_name

    root, client = world
    before = len(ldm_runs(client))
    outcome: dict = {}

    def retrain():
        outcome["state"] = retrain_flow(source=str(root / "batch2"), dataset=str(root / "dataset"), **QUICK,
                                        return_state=True)

    worker = threading.Thread(target=retrain)
    worker.start()
    deadline = time.monotonic() + 120
    while _active_slots(limit_name(MODEL)) < 1:
        assert worker.is_alive() and time.monotonic() < deadline, "the first retrain never took its slot"
        time.sleep(0.5)
    # A second retrain of the same model while the first holds the slot: refused at once, nothing run.
    refused = retrain_flow(source=str(root / "batch2"), dataset=str(root / "dataset"), **QUICK, return_state=True)
    assert refused.is_failed() and "another retrain of 'ldm-retrain-test'" in refused.message, refused.message
    assert task_runs(refused.state_details.flow_run_id) == []
    worker.join(timeout=900)
    assert not worker.is_alive(), "the retrain did not finish within 15 min"

    state = outcome["state"]
    assert state.is_completed(), state.message
    result = state.result()
    assert result["trained"] and result["init"] == "1" and result["shards"]["written"] == 12
    dataset = read_dataset(str(root / "dataset"))
    assert len(dataset.parts) == 2 and dataset.total_samples == 36
    assert len(ldm_runs(client)) == before + 1  # the refused retrain trained nothing
    run = client.get_run(result["run_id"])
    assert run.data.params["model.unet.pretrained"] == f"models:/{MODEL}/1"
    assert result["model"]["version"] == "2"
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    assert champion == ("2" if result["model"]["gate"]["promoted"] else "1")
    assert _active_slots(limit_name(MODEL)) == 0
