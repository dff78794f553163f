"""The encode step on Prefect's local server: encode_flow alone (default tier: no training, no Ray), then the
train flow with `latents` with the embedded MLflow store and a local Ray (slow: it trains as a Ray job):
the raw shards are encoded into latent shards, the LDM is trained from those and its run names the latent
dataset and the raw data behind it; the same flow again reuses the cached encode and training. Tiny
preset at 32 px, 1 worker, 2 steps; the encode runs in the flow's process (workers 0, the cheapest;
`ldmflow encode`'s Ray actors are tested in tests/training/encode)."""

from __future__ import annotations

import pytest

from tests.pipelines.prefect_fixtures import artifact_text, task_runs

MODEL = "ldm-latents-flow-test"
OVERRIDES = ["model.resolution=32", "train.max_steps=2", "train.num_workers=1", "train.batch_size=4",
             "train.log_every=1", "train.checkpoint_every=2", "validation.every=2", "validation.max_samples=4",
             "tracking.sample_steps=1", f"tracking.model_name={MODEL}"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    root = tmp_path_factory.mktemp("latents-flow")
    generate_synthetic(str(root / "images"), 16, seed=2, image_size=32)
    build_shards(ShardConfig(source=str(root / "images"), output=str(root / "shards"), resolution=32,
                             samples_per_shard=8, progress=False))
    return str(root / "shards")


def train_on_latents(raw: str, latents_dir: str):
    from pipelines.flows import train_flow

    state = train_flow(data=raw, config="tiny", overrides=OVERRIDES, latents=True, latents_dir=latents_dir,
                       encode_workers=0, return_state=True)
    assert state.is_completed(), state.message
    return state, state.result()


def states_of(state) -> dict[str, str]:
    return {t.name.rsplit("-", 1)[0]: t.state.name for t in task_runs(state.state_details.flow_run_id)}


def test_the_encode_flow_is_cached_unless_the_encoders_or_the_place_change(prefect_server, raw, tmp_path):
    from data_prep.dataset import read_dataset
    from pipelines.flows import encode_flow
    from training.loader.latents import latents_info

    def encode(latents_dir: str, *extra: str):
        state = encode_flow(data=raw, latents_dir=latents_dir, config="tiny", overrides=[*OVERRIDES, *extra],
                            workers=0, return_state=True)
        assert state.is_completed(), state.message
        return state, state.result()

    state, first = encode(str(tmp_path / "a"))
    assert states_of(state) == {"frozen_task": "Completed", "encode_task": "Completed"}
    info = latents_info(read_dataset(first["output"]))
    assert info is not None and info.source_content_id == read_dataset(raw).content_id == first["source_content_id"]
    assert (first["samples"], first["encoded"], first["kept"]) == (16, 2, 0)
    report = artifact_text(state.state_details.flow_run_id, "ldm-encode-report")
    assert "| latent samples | 16 |" in report and "| latent shards encoded now | 2 |" in report
    assert "| samples | 16 |" in artifact_text(state.state_details.flow_run_id, "encode-report")
    # Cached on the raw data's content id, the encoders' hashes and the encoding config (and where the
    # latents are kept): a change that only concerns training is the same encode.
    again, second = encode(str(tmp_path / "a"), "train.max_steps=3")
    assert states_of(again)["encode_task"] == "Cached" and second == first
    # Another VAE (same shapes, other weights): another encode, under another name.
    other_state, other = encode(str(tmp_path / "a"), "model.vae.seed=1")
    assert states_of(other_state)["encode_task"] == "Completed" and other["output"] != first["output"]
    assert other["encoding_id"] != first["encoding_id"] and other["content_id"] != first["content_id"]
    # The same latents asked for elsewhere (another bucket, a prefix every node reads) are written there.
    moved_state, moved = encode(str(tmp_path / "b"))
    assert states_of(moved_state)["encode_task"] == "Completed" and moved["output"].startswith(str(tmp_path / "b"))
    assert (moved["encoding_id"], moved["content_id"]) == (first["encoding_id"], first["content_id"])


@pytest.mark.slow  # ~80 s on 2 cores: a Ray job trains (Ray, its driver, DeepSpeed) and the model is exported
def test_the_train_flow_encodes_trains_from_latents_and_a_rerun_reuses_the_encode(prefect_server, local_ray, raw,
                                                                                    tmp_path):
    from mlflow import MlflowClient

    from data_prep.dataset import read_dataset
    from pipelines.params import run_config
    from training.loader.latents import latents_info
    from training.locations import setup_mlflow
    from training.tasks import frozen_hashes_for

    state, result = train_on_latents(raw, str(tmp_path / "latents"))
    latents, source = result["latents"], read_dataset(raw)
    # The latent dataset: every raw sample, made from this raw dataset by the config's exact encoders.
    dataset = read_dataset(latents["output"])
    info = latents_info(dataset)
    assert info is not None and info.source_content_id == source.content_id == latents["source_content_id"]
    cfg = run_config("config", "tiny", OVERRIDES, task="ldm")
    assert {"vae": info.vae["sha256"], "text_encoder": info.text_encoder["sha256"]} == frozen_hashes_for(cfg)
    assert (latents["samples"], latents["encoded"], latents["kept"]) == (16, 2, 0) == \
        (dataset.total_samples, len(dataset.shards), 0)
    assert latents["output"].startswith(str(tmp_path / "latents")) and latents["encoding_id"][:16] in latents["output"]
    assert states_of(state)["encode_task"] == "Completed"
    # The LDM trained from the latent shards: its run reads them, and names the raw data behind them.
    setup_mlflow()
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.tags["data"] == latents["output"]
    assert run.data.tags["dataset_content_id"] == dataset.content_id == latents["content_id"]
    assert run.data.tags["source_content_id"] == source.content_id
    assert run.data.params["data.total_samples"] == "16" and run.data.params["train.max_steps"] == "2"
    # Counts in the markdown artifacts: the encode step's and the flow's.
    encode_report = artifact_text(state.state_details.flow_run_id, "encode-report")
    assert "| samples | 16 |" in encode_report and "| encoded now | 2 |" in encode_report
    report = artifact_text(state.state_details.flow_run_id, "ldm-train-report")
    assert f"| latent dataset | {latents['output']} |" in report and "| latent samples | 16 |" in report
    assert "| latent shards encoded now | 2 |" in report

    # The same flow again: the encode (and the training on its latents) are cache hits; nothing is encoded.
    again, second = train_on_latents(raw, str(tmp_path / "latents"))
    assert states_of(again)["encode_task"] == "Cached" and states_of(again)["train_task"] == "Cached"
    assert second["latents"] == latents and second["run_id"] == result["run_id"]
    assert read_dataset(latents["output"]).content_id == dataset.content_id


@pytest.mark.slow  # ~2 min on 2 cores: a Ray job trains, the model is exported, evaluated by the gate, promoted
def test_a_retrain_on_latents_then_nothing_new_trains_nothing(prefect_server, local_ray, tmp_path):
    """The champion trained on latents: its version's dataset id is the latent dataset's, so retrain
    compares the raw data with its run's `source_content_id` and trains nothing when nothing is new."""
    from data_prep.synth import generate_synthetic
    from pipelines.flows import retrain_flow

    generate_synthetic(str(tmp_path / "incoming"), 16, seed=4, image_size=32)
    model = "ldm-latents-retrain-test"
    params = {"source": str(tmp_path / "incoming"), "dataset": str(tmp_path / "dataset"), "config": "tiny",
              "overrides": [*OVERRIDES, f"tracking.model_name={model}", "gate.prompts=1", "gate.per_prompt=1",
                            "gate.steps=1", "gate.first_floor=0", "gate.floor=0", "gate.margin=0"],
              "evaluate": False, "latents": True, "latents_dir": str(tmp_path / "latents"), "encode_workers": 0}
    state = retrain_flow(**params, return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first["trained"] and first["model"]["gate"]["promoted"]
    assert first["latents"]["source_content_id"] == first["shards"]["content_id"] != first["latents"]["content_id"]
    again = retrain_flow(**params, return_state=True)
    assert again.is_completed(), again.message
    result = again.result()
    assert not result["trained"] and result["champion"] == first["model"]["version"]
    assert "nothing new" in result["reason"] and states_of(again).keys() == {"champion_task", "shard_task"}
