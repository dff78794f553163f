"""`mlflow models serve` over a registered version: what a consumer types to serve
`models:/NAME@ALIAS` answers REST requests with images, and a request over the model's limits or a
table without `prompt` gets HTTP 400 with a clear message (not a stack trace, not an out-of-memory
server). A real tracking server (SQLite store, proxied artifacts) on 127.0.0.1 holds the model; the
scoring server runs as its own process on a free port, bounded in its startup and stopped by the
fixture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from tests.mlflow_server import free_port
from tests.training.tiny_pipeline import tiny_pipeline
from training.locations import setup_mlflow
from training.mlops import pyfunc_model
from training.mlops.export import save_pipeline
from training.mlops.registry import register_pipeline
from training.models.sampling import RequestLimits, SamplerDefaults

NAME = "ldm-serve-test"
PROMPTS = ["a red circle on a blue background", "a yellow square on a black background"]
LIMITS = RequestLimits(max_prompts=2, max_batch=1, max_steps=3, max_guidance=8.0)
STARTUP_S = 240.0
"""Loading MLflow, torch and diffusers and downloading the model on 2 shared CPU cores."""


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    """The session's server (tests/conftest.py), this process pointed at it for the module."""
    server = mlflow_server
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    try:
        setup_mlflow()
        yield server
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        setup_mlflow()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_pipeline(tiny_pipeline(), tmp_path_factory.mktemp("serve") / "pipeline", SamplerDefaults(steps=2),
                         LIMITS)


@pytest.fixture(scope="module")
def served(tracking, folder, tmp_path_factory):
    """The scoring server for models:/NAME@candidate: its base URL."""
    mlflow.set_experiment("ldmflow-serve-test")
    with mlflow.start_run() as run:
        pass
    register_pipeline(run.info.run_id, folder, NAME, {})

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("scoring") / "serve.log"
    log = open(log_path, "wb")
    # Only the tracking URI: the consumer resolves the alias and downloads the model itself. The
    # scoring server execs `uvicorn` by name, so the environment's bin/ goes on PATH, as an activated
    # virtual environment has it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.uri, "PATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@candidate", "--env-manager",
         "local", "--host", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=log_path.parent)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"scoring server not up after {STARTUP_S} s: {log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rest_requests_get_images_and_bad_requests_a_400_with_a_clear_message(served, folder):
    # The images the same folder gives in process, for the same request.
    local = pyfunc_model.TextToImageModel()
    local.load_context(SimpleNamespace(artifacts={pyfunc_model.PIPELINE_ARTIFACT: str(folder)}))
    expected = local.predict(None, PROMPTS, {"steps": 2, "seed": 11})

    status, body = post(served, {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]},
                                 "params": {"steps": 2, "seed": 11}})
    assert status == 200, body
    images = np.array(body["predictions"], dtype=np.uint8)
    assert images.shape == (2, 32, 32, 3)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1

    status, body = post(served, {"inputs": {"prompt": PROMPTS[:1]}, "params": {"seed": 11, "steps": 2}})
    assert status == 200, body
    assert np.abs(np.array(body["predictions"], dtype=int)[0] - expected[0].astype(int)).max() <= 1

    # The model's logged input example is a request the server answers as it stands.
    example = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@candidate/serving_input_example.json",
                                                       dst_path=str(folder.parent / "example")))
    status, body = post(served, json.loads(example.read_text()))
    assert status == 200, body
    assert np.array(body["predictions"]).shape == (1, 32, 32, 3)

    refused = {
        "at most 2 prompts, got 3": {"dataframe_split": {"columns": ["prompt"],
                                                          "data": [[p] for p in (PROMPTS * 2)[:3]]}},
        "param `steps` must be between 1 and 3, got 500": {"inputs": {"prompt": PROMPTS[:1]}, "params": {"steps": 500}},
        "param `guidance` must be between 1 and 8, got 50": {"inputs": {"prompt": PROMPTS[:1]},
                                                             "params": {"guidance": 50.0}},
        "param `height` must be a multiple of 8 between 8 and 32 pixels, got 4096": {
            "inputs": {"prompt": PROMPTS[:1]}, "params": {"height": 4096}},
        # Refused by MLflow's own check of the logged signature (a required `prompt` column), before
        # predict; the pyfunc refuses such a table itself when called without MLflow's schema.
        "Model is missing inputs ['prompt']": {"dataframe_split": {"columns": ["text"], "data": [[PROMPTS[0]]]}},
    }
    for message, request in refused.items():
        status, body = post(served, request)
        print(f"{status} {body['error_code']} {body['message'][-160:]!r}")
        assert status == 400, body
        assert body["error_code"] == "INVALID_PARAMETER_VALUE", body
        assert message in body["message"]
        assert "stack_trace" not in body and "Traceback" not in body["message"]
