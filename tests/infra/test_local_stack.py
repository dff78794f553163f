"""The local stack (infra/local/stack) as real processes on 127.0.0.1: `up` (every service answering: S3
with enforced keys, MLflow artifacts on S3 through its proxy, Prefect with a worker, a two-node Ray
cluster taking a job), `up` again (nothing duplicated), `ldmflow deploy` to its Prefect server, a
deployment's run started and watched by `ldmflow run`, bad parameters refused in one line, the new-data
trigger (the sensor's event starts `retrain` only when items are new), and `down` (nothing left).

One stack for the module; it starts Prefect, MLflow, SeaweedFS and Ray: run it under the heavy lock.
Each test prints its time."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from infra.local.stack import SERVICES, Stack, StackConfig
from tests.readme_blocks import commands, marked_block

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "infra" / "local" / "stack"
IDLE_POOL = "ldmflow-test-idle"
"""A pool no worker polls: the trigger's retrain runs wait there to be inspected instead of training."""


def stack_cmd(*args: str, folder: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(STACK), *args, "--dir", str(folder)], check=False, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "LDMFLOW_RUNS_DIR": str(folder / "runs")})


def ldmflow(stack: Stack, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.client_env(), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _timed(request):
    t0 = time.monotonic()
    yield
    print(f"\n{request.node.name}: {time.monotonic() - t0:.1f} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack")
    t0 = time.monotonic()
    up = stack_cmd("up", "--timeout", "300", folder=folder, timeout=1200)
    print(f"\nstack up: {time.monotonic() - t0:.1f} s\n{up.stdout}{up.stderr}")
    stack = Stack(StackConfig(folder=folder))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        stack.up_output = up.stdout
        yield stack
    finally:
        stack_cmd("down", folder=folder, timeout=300)


def records(stack: Stack) -> dict[str, dict]:
    return json.loads(stack.state_path.read_text())["services"]


# --- up ---------------------------------------------------------------------------------------------


def test_up_prints_urls_and_exports_and_every_service_answers(stack):
    out = stack.up_output
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
                "RAY_AUTH_TOKEN", "LDMFLOW_STORAGE"):
        assert f"export {key}={stack.client_env()[key]}" in out, key
    for name in SERVICES:
        assert f"{name}" in out and " up in " in out
    status = stack_cmd("status", folder=stack.folder)
    assert status.returncode == 0, status.stdout + status.stderr
    lines = dict(line.split(None, 1) for line in status.stdout.splitlines()[:len(SERVICES)])
    assert lines == {name: "up" for name in SERVICES}


def test_s3_enforces_the_stacks_keys(stack):
    from botocore.exceptions import ClientError

    client = stack.s3_client()
    assert {"mlflow", "ldm-data"} <= {b["Name"] for b in client.list_buckets()["Buckets"]}
    import boto3

    wrong = boto3.session.Session().client("s3", endpoint_url=stack.urls()["s3"], region_name="us-east-1",
                                           aws_access_key_id=stack.client_env()["AWS_ACCESS_KEY_ID"],
                                           aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError) as refused:
        wrong.list_objects_v2(Bucket="ldm-data")
    assert refused.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")


def test_mlflow_artifacts_land_in_s3_through_the_server(stack):
    """A client with only MLFLOW_TRACKING_URI (no S3 settings) logs an artifact; it is in the `mlflow` bucket."""
    code = ("import mlflow, sys; c = mlflow.MlflowClient(sys.argv[1]); e = c.create_experiment('stack-probe'); "
            "r = c.create_run(e); c.log_text(r.info.run_id, 'probe', 'probe.txt'); print(r.info.run_id)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] = "false"
    proc = subprocess.run([sys.executable, "-c", code, stack.urls()["mlflow"]], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    keys = [o["Key"] for o in stack.s3_client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(run_id in key and key.endswith("probe.txt") for key in keys), keys


def test_ray_cluster_has_two_nodes_and_takes_a_job(stack):
    """`ray job submit` with the printed environment (RAY_API_SERVER_ADDRESS, the token) runs on a cluster of 2."""
    env = {**os.environ, **stack.client_env()}
    code = "import ray; ray.init(); print('nodes', len([n for n in ray.nodes() if n['Alive']]))"
    ray_bin = Path(sys.executable).parent / "ray"
    proc = subprocess.run([str(ray_bin), "job", "submit", "--", sys.executable, "-c", code], env=env,
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nodes 2" in proc.stdout, proc.stdout[-3000:]


def test_up_again_starts_no_duplicates(stack):
    before = {name: r["pid"] for name, r in records(stack).items()}
    again = stack_cmd("up", folder=stack.folder)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {name: r["pid"] for name, r in records(stack).items()} == before
    assert again.stdout.count("already running") == len(SERVICES), again.stdout
    weeds = [p for p in psutil.process_iter(["cmdline"])
             if p.info["cmdline"] and "mini" in p.info["cmdline"]
             and f"-dir={stack.folder / 'seaweedfs'}" in p.info["cmdline"]]
    assert len(weeds) == 1, weeds


# --- deployments --------------------------------------------------------------------------------------


def test_deploy_and_ldmflow_run_a_deployment(stack, tmp_path):
    from data_prep.synth import generate_synthetic

    first = ldmflow(stack, "deploy", "--only", "watch-source")
    assert first.returncode == 0, first.stdout + first.stderr
    again = ldmflow(stack, "deploy", "--only", "watch-source")
    assert again.stdout == first.stdout, "deploying again must update the deployment, not add one"

    generate_synthetic(tmp_path / "raw", 4, seed=1, image_size=32)
    t0 = time.monotonic()
    run = ldmflow(stack, "run", "watch-source", "--param", f"source={tmp_path / 'raw'}",
                  "--param", f"dataset={tmp_path / 'dataset'}", "--timeout", "300")
    print(f"ldmflow run watch-source: {time.monotonic() - t0:.1f} s\n{run.stdout}")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "watch-source: flow run" in run.stdout and "COMPLETED" in run.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["no-such-deployment"], "no deployment 'no-such-deployment'"),
    (["watch-source", "--param", "sorce=/tmp/x", "--param", "dataset=/tmp/y"], "has no parameter sorce"),
    (["watch-source", "--param", "source=[1, 2]", "--param", "dataset=/tmp/y"], "refused the parameters"),
    (["watch-source", "--param", "source"], "--param takes KEY=VALUE"),
])
def test_ldmflow_run_refuses_bad_input_in_one_line(stack, args, expected):
    proc = ldmflow(stack, "run", *args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ldmflow run: error:") and expected in lines[0], proc.stderr


def prefect_api(stack: Stack):
    """The stack's API for this process's Prefect client (settings are read when prefect is imported: an
    environment variable set afterwards is not seen)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: stack.urls()["prefect_api"]})


def retrain_runs_for(stack: Stack, deployment_id: str, source: str) -> list:
    """Flow runs of the retrain deployment for this source (the cron schedule's own runs have the defaults)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with prefect_api(stack), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.parameters.get("source") == source]


def test_new_items_event_starts_retrain_only_when_items_are_new(stack, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    with prefect_api(stack), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=IDLE_POOL, type="process"), overwrite=True)
    # prefect.yaml's retrain deployment with its trigger, on a pool no worker polls (the triggered run waits
    # there to be read, instead of training).
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    retrain = next(d for d in spec["deployments"] if d["name"] == "retrain")
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    deployed = ldmflow(stack, "deploy", "--prefect-file", str(tmp_path / "prefect.yaml"), "--only", "retrain",
                       "--pool", IDLE_POOL)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deployment_id = deployed.stdout.split("(")[1].split(")")[0]
    assert ldmflow(stack, "deploy", "--only", "watch-source").returncode == 0

    source, dataset = tmp_path / "raw", tmp_path / "dataset"
    generate_synthetic(source, 4, seed=2, image_size=32)
    build_shards(ShardConfig(source=str(source), output=str(dataset), resolution=32, progress=False))

    def sensor() -> None:
        run = ldmflow(stack, "run", "watch-source", "--param", f"source={source}", "--param", f"dataset={dataset}",
                      "--timeout", "300")
        assert run.returncode == 0, run.stdout + run.stderr

    # Nothing new: no event, no retrain.
    t0 = time.monotonic()
    sensor()
    time.sleep(15)  # a triggered run appears within seconds of the event (below); none may appear here
    assert retrain_runs_for(stack, deployment_id, str(source)) == []
    print(f"nothing new -> no retrain: {time.monotonic() - t0:.1f} s")

    # Two new images, one under a file name the dataset already has (new bytes): the event starts retrain.
    other = tmp_path / "other"
    generate_synthetic(other, 2, seed=99, image_size=32)
    taken = min(p.name for p in source.glob("*.png"))
    new_files = sorted(other.glob("*.png"))
    assert len(new_files) == 2
    for i, image in enumerate(new_files):
        name = taken if i == 0 else f"fresh-{image.name}"
        shutil.copy(image, source / name)
        shutil.copy(image.with_suffix(".txt"), source / Path(name).with_suffix(".txt"))
    t0 = time.monotonic()
    sensor()
    deadline = time.monotonic() + 90
    runs = []
    while time.monotonic() < deadline and not runs:
        runs = retrain_runs_for(stack, deployment_id, str(source))
        time.sleep(1)
    print(f"new items -> retrain flow run created: {time.monotonic() - t0:.1f} s")
    assert len(runs) == 1, runs
    assert runs[0].parameters["dataset"] == str(dataset)
    assert runs[0].parameters["config"] == retrain["parameters"]["config"]  # the rest: defaults
    with prefect_api(stack), get_client(sync_client=True) as client:
        client.delete_flow_run(runs[0].id)


def test_retrain_cron_schedule_creates_scheduled_runs(stack):
    """The stack's server runs the scheduler (the temporary server does not): the retrain deployment deployed
    above has runs scheduled at prefect.yaml's cron time (03:00 UTC), with its default parameters."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from pipelines.deployments import find_deployment

    deadline, scheduled = time.monotonic() + 90, []
    with prefect_api(stack), get_client(sync_client=True) as client:
        deployment = find_deployment(client, "retrain")
        while time.monotonic() < deadline and not scheduled:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
            scheduled = [r for r in runs if r.state and r.state.is_scheduled()
                         and r.parameters.get("source") == deployment.parameters["source"]]
            time.sleep(2)
    assert scheduled, "the scheduler created no run for the cron schedule (see the stack's logs/prefect.log)"
    starts = [r.expected_start_time.astimezone(datetime.timezone.utc) for r in scheduled]
    assert all((t.hour, t.minute) == (3, 0) for t in starts), starts


def test_readme_running_on_a_cluster_lines_run(stack, tmp_path):
    """The README's "Running on a cluster" block, then its "Scheduling retraining" block, line by line in bash
    with the environment `stack env` exports (the module's stack; its folder given by --dir): `up` finds it
    running, `deploy` puts every deployment on its Prefect server, `run retrain` trains from the synthetic
    source on the stack's worker and Ray cluster and registers a version in its MLflow (steps and evaluation
    sizes bounded by extra --param), `train --submit` starts a Ray Job that `job stop` stops while it runs, the
    sensor finds nothing new, and `deploy --only retrain` updates the same deployment."""
    lines = commands(marked_block("cluster")) + commands(marked_block("scheduling"))
    kinds = [line.split()[1] if line.startswith("ldmflow") else line.split()[0] for line in lines]
    assert kinds == ["infra/local/stack", "eval", "deploy", "synth", "run", "train", "job", "run", "deploy"], lines
    stack_bin, folder = str(STACK), str(stack.folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(line: str, timeout: float = 300) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, check=False, capture_output=True,
                              text=True, timeout=timeout)
        print(f"{line[:100]}: {time.monotonic() - t0:.1f} s, exit {proc.returncode}")
        return proc

    def on_stack(line: str) -> str:
        return line.replace("infra/local/stack up", f"{stack_bin} up --dir {folder}").replace(
            "infra/local/stack env", f"{stack_bin} env --dir {folder}")

    up, export, deploy, synth, retrain, submit, stop, sensor, redeploy = lines
    proc = sh(on_stack(up))
    assert proc.returncode == 0 and proc.stdout.count("already running") == len(SERVICES), proc.stdout + proc.stderr
    proc = sh(on_stack(export) + " && env -0")
    assert proc.returncode == 0, proc.stderr
    env = dict(item.split("=", 1) for item in proc.stdout.split("\0") if "=" in item)
    assert {k: env.get(k) for k in stack.client_env()} == stack.client_env()

    proc = sh(deploy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = dict(line.removeprefix("deployed ").rstrip(")").split(" (") for line in proc.stdout.splitlines()
               if line.startswith("deployed "))
    assert set(ids) == {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}, (
        proc.stdout)
    proc = sh(synth, timeout=120)
    assert proc.returncode == 0 and len(list((tmp_path / "data/incoming").glob("*.png"))) == 256, proc.stderr

    # Bounded: 2 training steps, evaluation and gate on 2 prompts x 1 image of 2 steps.
    bounds = (" --param 'overrides=[train.max_steps=2, gate.prompts=2, gate.per_prompt=1, gate.steps=2]'"
              " --param eval_prompts=2 --param eval_per_prompt=1 --param eval_steps=2 --timeout 1200")
    proc = sh(retrain + bounds, timeout=1300)
    assert proc.returncode == 0 and "COMPLETED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    import mlflow

    versions = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_model_versions("name='ldm-tiny'")
    assert len(versions) == 1 and versions[0].tags.get("dataset_content_id"), versions

    # The submitted job runs the tiny preset's 150 steps unless stopped; it is stopped once it has started.
    err = tmp_path / "submit.err"
    with err.open("w") as sink:
        job = subprocess.Popen(["bash", "-c", submit + " --timeout 900"], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=sink)
        try:
            deadline = time.monotonic() + 300
            while "Ray job " not in err.read_text() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(1)
            submitted = [line.split()[-1] for line in err.read_text().splitlines() if line.startswith("Ray job ")]
            assert submitted and job.poll() is None, err.read_text()[-3000:]
            time.sleep(10)  # let the driver start training
            proc = sh(stop, timeout=300)
            assert proc.returncode == 0 and proc.stdout.strip() == f"stopped Ray job {submitted[0]}", (
                proc.stdout + proc.stderr)
            job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
    assert job.returncode == 1 and "STOPPED" in err.read_text(), err.read_text()[-3000:]

    proc = sh(sensor)
    assert proc.returncode == 0 and "COMPLETED" in proc.stdout, proc.stdout + proc.stderr
    proc = sh(redeploy)
    assert proc.returncode == 0 and f"deployed retrain ({ids['retrain']})" in proc.stdout.splitlines(), proc.stdout


# --- down -------------------------------------------------------------------------------------------


def test_down_stops_everything(stack):
    recorded = records(stack)
    down = stack_cmd("down", folder=stack.folder, timeout=300)
    print(down.stdout)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(stack.ray_temp(node).exists() for node in ("head", "second"))
    for name, record in recorded.items():
        try:
            proc = psutil.Process(record["pid"])
            assert abs(proc.create_time() - record["create_time"]) >= 1 or proc.status() == psutil.STATUS_ZOMBIE, name
        except psutil.NoSuchProcess:
            pass
    for name in ("prefect", "mlflow", "s3", "ray", "dashboard"):
        # Nothing answers (a bind could still fail for a minute: the server's closed connections in TIME_WAIT).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", stack.ports[name]), timeout=5).close()
    status = stack_cmd("status", folder=stack.folder)
    assert status.returncode == 1 and status.stdout.split().count("down") == len(SERVICES), status.stdout
    assert stack_cmd("down", folder=stack.folder).returncode == 0
