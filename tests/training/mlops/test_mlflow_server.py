"""Against a real `mlflow server` (SQLite store) whose artifacts live on S3 (SeaweedFS) behind the server's
artifact proxy, as in infra/: S3's endpoint and credentials are in the server's environment only, and the
S3 host name resolves for the server alone (tests/mlflow_server.py), so a client that touched S3 directly
would fail. Clients here run without any AWS_* setting."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.mlflow_server import S3_HOST_ONLY_THE_SERVER_RESOLVES, MlflowServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, s3_server):
    """An MLflow server with S3 artifacts through its proxy, one for the module (a start costs seconds of
    CPU): its tests only log to it, each in runs of its own, and none stops it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3=s3_server, s3_prefix="mlflow").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxied_server(proxied, monkeypatch):
    """`proxied`, with this process as its client for one test: no AWS_* variable, no AWS config file and
    MLFLOW_TRACKING_URI pointing at the server."""
    server = proxied
    for key in [k for k in os.environ if k.startswith("AWS_") or k.startswith("MLFLOW_S3_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    # setup_mlflow's defaults, restored after the test (monkeypatch undoes only what it set itself).
    from training.locations import PROXIED_ARTIFACTS_ENV

    for key in PROXIED_ARTIFACTS_ENV:
        monkeypatch.delenv(key, raising=False)
    return server


def _s3_keys(server: MlflowServer) -> dict[str, int]:
    bucket, _, prefix = server.artifacts_destination.removeprefix("s3://").partition("/")
    pages = server.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def test_a_pipeline_sized_folder_goes_through_the_proxy_and_back(proxied_server, tmp_path, monkeypatch):
    """300 MB in a pipeline-like folder (one 160 MB file, above the multipart threshold set here) logs and
    downloads back byte-identical through the server, from a client that has no S3 access at all; the
    bytes are in the S3 bucket, not on the server's disk."""
    import mlflow

    from training.locations import PROXIED_ARTIFACTS_ENV, setup_mlflow

    # MLflow's proxy multipart upload starts at 500 MB; lowered so the 160 MB file would take the presigned
    # path if it were enabled (the folder stays small enough for a 2-core machine).
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(64 * 1024**2))
    folder = tmp_path / "pipeline"
    sizes = {"unet/diffusion_pytorch_model.safetensors": 160, "text_encoder/model.safetensors": 90,
             "vae/diffusion_pytorch_model.safetensors": 50}
    for rel, mb in sizes.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / rel, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1024**2))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    local = {p.relative_to(folder).as_posix(): _sha256(p) for p in folder.rglob("*") if p.is_file()}

    assert setup_mlflow() == proxied_server.uri
    for key, value in PROXIED_ARTIFACTS_ENV.items():
        assert os.environ[key] == value
    t0 = time.monotonic()
    with mlflow.start_run() as run:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
        mlflow.log_artifacts(str(folder), "pipeline")
    upload_s = time.monotonic() - t0

    # This run's keys only: the module's other tests log to the same bucket.
    ours = f"/{run.info.run_id}/artifacts/pipeline/"
    stored = {k.split(ours, 1)[1]: size for k, size in _s3_keys(proxied_server).items() if ours in k}
    assert stored == {rel: (folder / rel).stat().st_size for rel in local}
    assert not (proxied_server.folder / "artifacts").exists(), "artifacts must go to S3, not the server's disk"

    t0 = time.monotonic()
    out = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="pipeline",
                                                   dst_path=str(tmp_path / "back")))
    download_s = time.monotonic() - t0
    back = {p.relative_to(out).as_posix(): _sha256(p) for p in out.rglob("*") if p.is_file()}
    assert back == local
    print(f"300 MB through the proxy: upload {upload_s:.1f} s, download {download_s:.1f} s")


def test_without_the_setting_a_client_goes_around_the_proxy(proxied_server, tmp_path, monkeypatch, caplog):
    """Why setup_mlflow sets MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD: MLflow 3.17 reads the server's
    /server-info and, for an S3 destination, downloads through presigned URLs that name S3 as the server
    knows it, which this client cannot reach (as a laptop cannot reach a cluster-internal S3)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.locations import setup_mlflow

    setup_mlflow()
    (tmp_path / "small.txt").write_text("through the proxy")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "small.txt"))
    # Proxied (setup_mlflow's default): fine.
    got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="small.txt",
                                              dst_path=str(tmp_path / "a"))
    assert Path(got).read_text() == "through the proxy"
    # MLflow's own default: presigned, straight to the S3 host.
    monkeypatch.delenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD")
    # Each attempt at a presigned chunk retries 5 times with back-off (hard-coded in mlflow.utils.request_utils
    # .download_chunk: about a minute), and the failed chunk is attempted again MLFLOW_HTTP_REQUEST_MAX_RETRIES
    # times (default 7: about 12 minutes in all); then the error blames the path, not the unreachable S3 host.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # And the chunk's own 5 retries (about a minute of back-off) down to one, which urllib3 logs.
    from mlflow.utils import request_utils

    defaults = request_utils.cloud_storage_http_request.__defaults__
    monkeypatch.setattr(request_utils.cloud_storage_http_request, "__defaults__", (1, *defaults[1:]))
    # A logging.config.dictConfig run earlier in the session (Prefect's, Ray's) disables loggers that
    # existed then, urllib3's among them.
    import logging

    monkeypatch.setattr(logging.getLogger("urllib3.connectionpool"), "disabled", False)
    monkeypatch.setattr(logging.getLogger("urllib3.connectionpool"), "propagate", True)
    with caplog.at_level("WARNING"), caplog.at_level("WARNING", logger="urllib3.connectionpool"), \
            pytest.raises(MlflowException, match="Failed to download") as failed:
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="small.txt",
                                            dst_path=str(tmp_path / "b"))
    # It went for the S3 host as the server names it (urllib3's retry warnings say so, or the error's
    # chain when an earlier test left urllib3's logger configured otherwise).
    chain, error = [], failed.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    seen = caplog.text + "\n".join(chain)
    assert S3_HOST_ONLY_THE_SERVER_RESOLVES in seen, seen[-3000:]


# A consumer that knows the tracking URI and nothing else of this project: a fresh interpreter, its own
# HOME and working directory, no AWS_* variables, no PYTHONPATH.
CONSUMER = textwrap.dedent("""
    import json, sys
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    model = mlflow.pyfunc.load_model(sys.argv[1])
    images = model.predict(pd.DataFrame({"prompt": ["a red circle on a blue background"]}),
                           params={"seed": 1, "steps": 2})
    images = np.asarray(images)
    print(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype), "max": int(images.max()),
                      "min": int(images.min())}))
""")


def test_train_register_champion_and_load_elsewhere(proxied_server, tmp_path, capsys):
    """The tiny preset trains against the server (1 worker, a few steps), is published and registered,
    the gate (`ldmflow train --promote`) makes its version `champion`, and a separate process with only
    the tracking URI (and the proxied-download switch a client outside the S3 network needs with MLflow
    3.17) loads
    `models:/NAME@champion` and generates an image."""
    import ray
    from mlflow import MlflowClient

    from pipelines.cli import main
    from training.locations import PROXIED_ARTIFACTS_ENV, setup_mlflow

    data = tmp_path / "shards"
    assert main(["synth", "--out", str(tmp_path / "raw"), "--n", "16"]) == 0
    assert main(["shard", "--source", str(tmp_path / "raw"), "--output", str(data), "--samples-per-shard", "8",
                 "--no-progress"]) == 0
    t0 = time.monotonic()
    try:
        code = main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--data", str(data), "--max-steps", "2",
                     "--num-workers", "1", "--set", "train.checkpoint_every=2", "--set", "tracking.sample_steps=2",
                     "--set", "tracking.run_name=against-the-server", "--promote",
                     # The gate for real, on a small seeded set; two steps of training draw no shapes, so
                     # no floor.
                     "--set", "gate.first_floor=0", "--set", "gate.floor=0", "--set", "gate.prompts=2",
                     "--set", "gate.per_prompt=1", "--set", "gate.steps=2"])
    finally:
        ray.shutdown()
    train_s = time.monotonic() - t0
    out = capsys.readouterr().out
    assert code == 0, out
    run_id = out.split("MLflow run ", 1)[1].split(";")[0]
    setup_mlflow()
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    name = "ldm-tiny"
    versions = [mv for mv in client.search_model_versions(f"name='{name}'") if mv.run_id == run_id]
    assert len(versions) == 1, versions
    version = versions[0].version
    assert client.get_model_version_by_alias(name, "candidate").version == version
    # `--promote` ran the gate: the first version, above the (zero) first floor, is champion, recorded.
    assert f"{name} v{version}: promoted to champion: first version" in out, out
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == version and champion.tags["gate.decision"] == "promoted", champion.tags
    # The model's files are in the bucket.
    assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") for k in _s3_keys(proxied_server))

    home = tmp_path / "consumer-home"
    home.mkdir()
    env = {"MLFLOW_TRACKING_URI": proxied_server.uri, "HOME": str(home), **PROXIED_ARTIFACTS_ENV}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CONSUMER, f"models:/{name}@champion"], env=env, cwd=home,
                          capture_output=True, text=True, timeout=300)
    consume_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 64, 64, 3] and result["dtype"] == "uint8", result
    assert result["max"] > result["min"], "a constant image is no generation"
    print(f"train+publish {train_s:.1f} s, consumer load+generate {consume_s:.1f} s")


def test_allowed_hosts_is_what_lets_service_names_in(tmp_path):
    """What infra/ relies on: MLflow refuses a Host header it was not told about (a Kubernetes Service
    name), matches `--allowed-hosts` entries exactly (port included), and keeps /health open either way
    (so probes pass while clients are refused)."""
    import urllib.error
    import urllib.request

    service = "mlflow.mlops.svc.cluster.local:5000"
    server = MlflowServer(tmp_path / "hosts", extra_args=("--allowed-hosts", f"{service},127.0.0.1:*")).start()

    def status(path: str, host: str) -> int:
        request = urllib.request.Request(f"{server.uri}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        assert status(search, service) == 200
        assert status(search, "mlflow.mlops.svc.cluster.local") == 403, "entries match host:port exactly"
        assert status(search, "mlflow.example.com") == 403
        assert status("/health", "mlflow.example.com") == 200
    finally:
        server.stop()
