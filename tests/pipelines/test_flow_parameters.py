"""Bad flow parameters fail the flow run at once on Prefect's local server, naming the parameter,
before any task runs or anything is written."""

from __future__ import annotations

import pytest

from tests.pipelines.prefect_fixtures import task_runs


@pytest.fixture
def source(tmp_path):
    from data_prep.synth import generate_synthetic

    generate_synthetic(str(tmp_path / "raw"), 4, seed=0, image_size=64)
    return str(tmp_path / "raw")


@pytest.mark.parametrize(("change", "words"), [
    # Refused by the parameter's type when the run starts (Prefect's message names it: "name: why")...
    ({"config": "no-such-preset"}, "config: Value error, config file no-such-preset does not exist"),
    ({"overrides": ["train.max_steps"]}, "overrides.0: Value error, override 'train.max_steps' must look like"),
    ({"lock_wait_s": -1}, "lock_wait_s: Input should be greater than or equal to 0"),
    ({"train_timeout_s": 0}, "train_timeout_s: Input should be greater than 0"),
    ({"eval_prompts": 0}, "eval_prompts: Input should be greater than or equal to 1"),
    ({"dataset": "gs://bucket/data"}, "dataset: Value error, unsupported storage URI"),
    ({"latents": True, "encode_workers": -1}, "encode_workers: Input should be greater than or equal to 0"),
    ({"latents": True, "latents_dir": "gs://bucket/latents"}, "latents_dir: Value error, unsupported storage URI"),
    # ... or in the flow's first lines, which resolve the config and check the storage.
    ({"overrides": ["train.max_steps=many"]}, "flow parameter `config` (tiny): config key `train.max_steps`"),
    ({"overrides": ["train.no_such_key=1"]}, "unknown config key `train.no_such_key`"),
    ({"config": "shapes-vae"}, "flow parameter `config`: shapes-vae is a `vae` config"),
    ({"source": "/no/such/folder"}, "flow parameter `source`: local path /no/such/folder does not exist"),
], ids=lambda v: str(v)[:40])
def test_a_bad_parameter_fails_the_retrain_before_any_work(prefect_server, source, tmp_path, change, words):
    from pipelines.flows import retrain_flow

    dataset = tmp_path / "dataset"
    params = {"source": source, "dataset": str(dataset), "config": "tiny", **change}
    state = retrain_flow(**params, return_state=True)
    assert state.is_failed()
    error = f"{state.message} {state.result(raise_on_failure=False)}"
    assert words in error, error
    assert not dataset.exists()
    assert task_runs(state.state_details.flow_run_id) == []
