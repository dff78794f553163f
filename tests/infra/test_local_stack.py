"""The local stack (infra/local/stack) as real processes on 127.0.0.1: `up` (every service answering: S3
with enforced keys, MLflow artifacts on S3 through its proxy, Prefect with a worker, a two-node Ray
cluster taking a job), `up` again (nothing duplicated), `ldmflow deploy` to its Prefect server, a
deployment's run started and watched by `ldmflow run`, bad parameters refused in one line, the new-data
trigger (the sensor's event starts `retrain` only when items are new), retraining for real through the
stack (new images -> the trigger -> a new part, a Ray job on the two nodes, a new version in the stack's
MLflow and the gate; nothing new -> nothing trained), the training job stopped through Ray (the flow run
fails naming it; its rerun resumes the same MLflow run), the flow worker killed mid-training (a new
worker's rerun re-attaches to the same job), and `down` (nothing left).

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

    def sensor(source: Path) -> None:
        run = ldmflow(stack, "run", "watch-source", "--param", f"source={source}", "--param", f"dataset={dataset}",
                      "--timeout", "300")
        assert run.returncode == 0, run.stdout + run.stderr

    # Nothing new: no event, no retrain. The check that no run appears is made at the end: the new items' part
    # below (in another copy of the source, so that the runs tell the two apart) takes longer than a triggered
    # run takes to appear, where a fixed 15 s sleep stood here before.
    unchanged = tmp_path / "unchanged"
    shutil.copytree(source, unchanged)
    sensor(unchanged)
    assert retrain_runs_for(stack, deployment_id, str(unchanged)) == []
    nothing_new_at = time.monotonic()

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
    sensor(source)
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

    # At least the 15 s a run triggered by the nothing-new sensor run had before (normally long past).
    time.sleep(max(0.0, nothing_new_at + 15 - time.monotonic()))
    assert retrain_runs_for(stack, deployment_id, str(unchanged)) == []
    print(f"nothing new -> no retrain, {time.monotonic() - nothing_new_at:.1f} s after its sensor run")


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


@pytest.mark.cluster
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


# --- retraining through the stack -----------------------------------------------------------------

E2E_MODEL = "ldm-stack-e2e"
E2E_OVERRIDES = ["train.max_steps=6", "train.batch_size=4", "train.log_every=2", "train.checkpoint_every=3",
                 "validation.every=6", "validation.max_samples=4", "tracking.sample_steps=2",
                 f"tracking.model_name={E2E_MODEL}", "gate.prompts=1", "gate.per_prompt=1", "gate.steps=2",
                 "gate.first_floor=0", "gate.floor=0", "gate.margin=0"]
"""The tiny preset shrunk to minutes on 2 cores (2 Ray workers, one per node, 6 steps); a gate every
version can pass, so the "nothing new" run finds its dataset under the champion."""
E2E_PARAMS = {"config": "tiny", "overrides": E2E_OVERRIDES, "eval_prompts": 1, "eval_per_prompt": 1, "eval_steps": 2,
              "shard_timeout_s": 300, "train_timeout_s": 900, "eval_timeout_s": 600}


def deploy_e2e_retrain(stack: Stack, folder: Path) -> str:
    """prefect.yaml's retrain deployment (its trigger and concurrency limit) on the pool the stack's worker
    polls, with E2E_PARAMS as its defaults (the trigger sets only source and dataset); its id."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    retrain = next(d for d in spec["deployments"] if d["name"] == "retrain")
    retrain["parameters"] = {**retrain["parameters"], **E2E_PARAMS}
    retrain["schedules"] = []  # the cron schedule is tested above; here only the trigger starts runs
    (folder / "prefect.yaml").write_text(yaml.safe_dump(spec))
    deployed = ldmflow(stack, "deploy", "--prefect-file", str(folder / "prefect.yaml"), "--only", "retrain",
                       "--pool", stack.config.work_pool)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    return deployed.stdout.split("(")[1].split(")")[0]


def wait_state(stack: Stack, flow_run_id, state_type: str, timeout: float):
    """The flow run once its state is of `state_type` (failing after `timeout` seconds)."""
    run = wait_final(stack, flow_run_id, timeout, until=lambda state: state.type.value == state_type)
    assert run.state and run.state.type.value == state_type, \
        f"flow run {flow_run_id} still {run.state} after {timeout:.0f} s"
    return run


def wait_final(stack: Stack, flow_run_id, timeout: float, until=lambda state: state.is_final()):
    """The flow run once its state is final (or meets `until`), or as it is after `timeout` seconds."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with prefect_api(stack), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if (run.state and until(run.state)) or time.monotonic() > deadline:
                return run
            time.sleep(3)


def stack_artifact(stack: Stack, flow_run_id, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with prefect_api(stack), get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert found, f"flow run {flow_run_id} published no artifact {key!r}"
    return found[-1].data


def ldm_runs(mlflow_client) -> list:
    experiment = mlflow_client.get_experiment_by_name("ldmflow")
    if experiment is None:
        return []
    return mlflow_client.search_runs([experiment.experiment_id],
                                     filter_string="tags.task = 'ldm'")


@pytest.mark.cluster
def test_new_images_retrain_through_the_stack_then_nothing_new_trains_nothing(stack, tmp_path):
    """The whole loop on the stack's services: the sensor's event makes the Prefect server start `retrain`
    on the stack's worker, which shards only the new images (two under names the source already had) into a
    new part, trains on the two-node Ray cluster with checkpoints on S3, registers and gates the version in
    the stack's MLflow. The deployment run again with nothing new trains and registers nothing."""
    import hashlib

    from mlflow import MlflowClient

    from data_prep.dataset import read_dataset, read_samples
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic

    phases: dict[str, float] = {}
    t0 = time.monotonic()
    # Runs an earlier test of this module trained on the same stack are not this test's.
    earlier = {r.info.run_id for r in ldm_runs(MlflowClient(stack.urls()["mlflow"]))}
    deployment_id = deploy_e2e_retrain(stack, tmp_path)
    assert ldmflow(stack, "deploy", "--only", "watch-source").returncode == 0
    source, dataset = tmp_path / "raw", tmp_path / "dataset"
    generate_synthetic(source, 16, seed=3, image_size=64)
    build_shards(ShardConfig(source=str(source), output=str(dataset), resolution=64, progress=False))
    before = read_dataset(str(dataset))
    assert before.total_samples == 16
    phases["deploy + first dataset"] = time.monotonic() - t0

    # Four new images: two replace files the source has (same names, new bytes), two have new names.
    other = tmp_path / "other"
    generate_synthetic(other, 4, seed=77, image_size=64)
    taken = sorted(p.name for p in source.glob("*.png"))[:2]
    new_sha: dict[str, str] = {}
    for i, image in enumerate(sorted(other.glob("*.png"))):
        name = taken[i] if i < len(taken) else f"fresh-{image.name}"
        shutil.copy(image, source / name)
        shutil.copy(image.with_suffix(".txt"), source / Path(name).with_suffix(".txt"))
        new_sha[name] = hashlib.sha256(image.read_bytes()).hexdigest()

    t0 = time.monotonic()
    sensor = ldmflow(stack, "run", "watch-source", "--param", f"source={source}", "--param", f"dataset={dataset}",
                     "--timeout", "300")
    assert sensor.returncode == 0, sensor.stdout + sensor.stderr
    runs, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline and not runs:
        runs = retrain_runs_for(stack, deployment_id, str(source))
        time.sleep(1)
    assert len(runs) == 1, runs
    phases["sensor -> retrain flow run created"] = time.monotonic() - t0

    t0 = time.monotonic()
    run = wait_final(stack, runs[0].id, timeout=1200)
    phases["triggered retrain (shard, train, register, evaluate, gate)"] = time.monotonic() - t0
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    report = stack_artifact(stack, run.id, "ldm-retrain-report")
    print(report)

    # Every new image is in the new part, and only there; nothing already held was written again.
    after = read_dataset(str(dataset))
    assert [p.name for p in after.parts[:len(before.parts)]] == [p.name for p in before.parts]
    added = after.parts[len(before.parts):]
    assert len(added) == 1 and after.total_samples == 16 + len(new_sha)
    records = read_samples(added[0].uri, added[0].manifest)
    assert sorted(r.sha256 for r in records) == sorted(new_sha.values())
    assert {Path(r.source_id).name for r in records} >= set(taken), [r.source_id for r in records]
    assert "| samples written | 4 |" in report

    # A new version in the stack's MLflow, trained on the dataset as it is now; champion only if the gate said so.
    client = MlflowClient(stack.urls()["mlflow"])
    versions = client.search_model_versions(f"name = '{E2E_MODEL}'")
    assert len(versions) == 1, [v.version for v in versions]
    version = client.get_model_version(E2E_MODEL, str(versions[0].version))
    assert version.tags["dataset_content_id"] == after.content_id
    assert f"| registered | {E2E_MODEL} v{version.version} (alias candidate) |" in report
    decision = version.tags["gate.decision"]
    champion = [str(v.version) for v in versions if "champion" in (client.get_model_version(
        E2E_MODEL, str(v.version)).aliases or [])]
    assert champion == ([str(version.version)] if decision == "promoted" else []), (decision, champion)
    assert ("promoted to champion" if decision == "promoted" else "not promoted") in report
    trained_runs = [r for r in ldm_runs(client) if r.info.run_id not in earlier]
    assert len(trained_runs) == 1 and trained_runs[0].info.status == "FINISHED"

    # Nothing new: the deployment run again (as its cron schedule would) trains nothing, and says so.
    t0 = time.monotonic()
    again = ldmflow(stack, "run", "retrain", "--param", f"source={source}", "--param", f"dataset={dataset}",
                    "--timeout", "600", timeout=700)
    phases["retrain with nothing new"] = time.monotonic() - t0
    assert again.returncode == 0 and "COMPLETED" in again.stdout, again.stdout + again.stderr
    again_id = again.stdout.split("(")[1].split(")")[0]
    assert "nothing trained" in stack_artifact(stack, again_id, "ldm-retrain-report")
    assert len([r for r in ldm_runs(client) if r.info.run_id not in earlier]) == 1
    assert len(client.search_model_versions(f"name = '{E2E_MODEL}'")) == 1
    assert read_dataset(str(dataset)).content_id == after.content_id
    for phase, seconds in phases.items():
        print(f"{phase}: {seconds:.1f} s")


class TrainingRun:
    """A retrain flow run of the stack's worker, started by `ldmflow run retrain --no-wait` on its own model,
    source and dataset, and what it trains: the Ray job of its `ldm` step (pipelines.tasks.training_job_key)
    and the MLflow run that job trains."""

    def __init__(self, stack: Stack, folder: Path, monkeypatch, *, model: str, steps: int, every: int,
                 lock_wait_s: int = 0):
        from data_prep.synth import generate_synthetic

        # This process reads the job's files on S3, the checkpoints and MLflow as the stack's clients do.
        for key, value in stack.client_env().items():
            monkeypatch.setenv(key, value)
        self.stack, self.steps = stack, steps
        source, dataset = folder / "raw", folder / "dataset"
        generate_synthetic(source, 16, seed=5, image_size=64)
        overrides = [o for o in E2E_OVERRIDES if not o.startswith(("train.max_steps", "train.checkpoint_every",
                                                                   "tracking.model_name"))]
        overrides += [f"train.max_steps={steps}", f"train.checkpoint_every={every}", "train.log_every=1",
                      f"tracking.model_name={model}"]
        # No Prefect retry of the train task and no evaluation or gate: what is tested is the job's fate.
        started = ldmflow(stack, "run", "retrain", "--no-wait", "--param", f"source={source}",
                          "--param", f"dataset={dataset}", "--param", f"overrides={json.dumps(overrides)}",
                          "--param", "train_retries=0", "--param", "evaluate=false", "--param", "promote=false",
                          "--param", f"lock_wait_s={lock_wait_s}", timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        self.flow_run_id = started.stdout.split("(")[1].split(")")[0]
        from pipelines.tasks import training_job_key

        self.key = training_job_key(self.flow_run_id, "ldm")

    def jobs(self) -> list:
        from training.runtime.jobs import attempts, jobs_client

        return attempts(jobs_client(), self.key)

    def run_id(self) -> str | None:
        from data_prep import storage
        from training.runtime.driver import default_storage
        from training.runtime.job_entry import run_file
        from training.runtime.jobs import key_dir

        uri = run_file(key_dir(default_storage(), self.key))
        try:
            return json.loads(storage.storage_for(uri).read_bytes(uri))["run_id"]
        except FileNotFoundError:
            return None

    def verified_step(self, run_id: str) -> int | None:
        from training.checkpoint.run_storage import run_uri
        from training.checkpoint.verify import latest_verified_checkpoint
        from training.runtime.driver import default_storage, ray_run_name

        latest = latest_verified_checkpoint(run_uri(default_storage(), ray_run_name(run_id)))
        return None if latest is None else latest.step

    def wait_for_checkpoint(self, timeout: float = 600) -> tuple[str, int]:
        """(MLflow run id, step) once the job has a verified checkpoint; the job is then still training."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run_id = self.run_id()
            step = self.verified_step(run_id) if run_id else None
            if step:
                return run_id, step
            time.sleep(1)
        raise AssertionError(f"no verified checkpoint within {timeout:.0f} s; jobs {self.jobs()}")

    def loss_steps(self, run_id: str) -> list[int]:
        from mlflow import MlflowClient

        return [m.step for m in MlflowClient(self.stack.urls()["mlflow"]).get_metric_history(run_id, "loss")]

    def rerun(self) -> None:
        """What the UI's Retry does: the flow run back to Scheduled, for a worker of its pool to run again.
        The same flow run, not a new run of the deployment: the job's key is the flow run's id, so only a
        rerun of this flow run finds its job (a new flow run would train a new MLflow run from scratch)."""
        from prefect.client.orchestration import get_client
        from prefect.states import Scheduled

        with prefect_api(self.stack), get_client(sync_client=True) as client:
            result = client.set_flow_run_state(self.flow_run_id, Scheduled(name="AwaitingRetry"), force=True)
        assert result.status.value == "ACCEPT", result

    def logs(self, text: str) -> list[str]:
        """The flow run's log lines that contain `text` (the job's own lines are in its log too: many)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        # Page by page (the server's text search answers 500 on the stack's SQLite store).
        lines: list[str] = []
        with prefect_api(self.stack), get_client(sync_client=True) as client:
            for page in range(100):
                found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id])),
                                         limit=200, offset=200 * page)
                lines += [entry.message for entry in found if text in entry.message]
                if len(found) < 200:
                    break
        return lines


@pytest.mark.cluster
def test_killing_the_training_job_fails_the_flow_run_and_its_rerun_resumes_the_run(stack, tmp_path, monkeypatch):
    """The training Ray job stopped through Ray's Jobs API while the retrain flow run trains: the flow run
    ends Failed naming the job; rerunning that flow run submits the job's second attempt, which resumes the
    same MLflow run from its last verified checkpoint (the steps continue, no new run)."""
    from mlflow import MlflowClient

    from training.runtime.jobs import jobs_client, submission_id

    deploy_e2e_retrain(stack, tmp_path)
    before = {r.info.run_id for r in ldm_runs(MlflowClient(stack.urls()["mlflow"]))}
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    job = TrainingRun(stack, tmp_path, monkeypatch, model="ldm-stack-kill-job", steps=30, every=5)
    run_id, verified = job.wait_for_checkpoint()
    first = submission_id(job.key)
    assert [(a.submission_id, a.status) for a in job.jobs()] == [(first, "RUNNING")]
    phases["flow run start -> first verified checkpoint"] = time.monotonic() - t0

    t0 = time.monotonic()
    jobs_client().stop_job(first)  # as `ray job stop` does
    failed = wait_final(stack, job.flow_run_id, timeout=300)
    at_stop = max(job.loss_steps(run_id), default=0)
    phases["job stopped -> flow run final"] = time.monotonic() - t0
    assert failed.state.is_failed(), f"{failed.state.name}: {failed.state.message}"
    assert first in failed.state.message and "STOPPED" in failed.state.message, failed.state.message
    assert [(a.submission_id, a.status) for a in job.jobs()] == [(first, "STOPPED")]
    assert at_stop < job.steps, f"the job had finished (step {at_stop}) before it was stopped"

    t0 = time.monotonic()
    job.rerun()
    rerun = wait_final(stack, job.flow_run_id, timeout=900)
    phases["rerun -> flow run completed"] = time.monotonic() - t0
    assert rerun.state.is_completed(), f"{rerun.state.name}: {rerun.state.message}"
    assert [(a.submission_id, a.status) for a in job.jobs()] == [(first, "STOPPED"),
                                                                 (submission_id(job.key, 2), "SUCCEEDED")]
    client = MlflowClient(stack.urls()["mlflow"])
    assert {r.info.run_id for r in ldm_runs(client)} - before == {run_id}, "the rerun started a new MLflow run"
    run = client.get_run(run_id)
    resumed_from = int(run.data.tags["resume.1.from_step"])
    assert verified <= resumed_from <= at_stop and resumed_from > 0, (verified, resumed_from, at_stop)
    assert set(job.loss_steps(run_id)) == set(range(1, job.steps + 1))
    assert run.info.status == "FINISHED"
    for phase, seconds in phases.items():
        print(f"{phase}: {seconds:.1f} s")


@pytest.mark.cluster
def test_a_new_worker_reattaches_the_running_job_of_a_killed_worker(stack, tmp_path, monkeypatch):
    """The flow worker and the flow-run process it started are SIGKILLed mid-training (the training job runs on
    the cluster and goes on); `stack up` starts another worker; the deployment's automation marks the silent
    flow run CRASHED (no heartbeat for 90 s); rerunning the flow run follows the same job
    (one job for the key, no second attempt, no resume): the steps continue past the kill and the run ends."""
    from training.runtime.jobs import submission_id

    deploy_e2e_retrain(stack, tmp_path)
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    # lock_wait_s: the killed flow run cannot release its retrain slot; the rerun waits for its lease to lapse
    # (pipelines.retrain_lock.SLOT_LEASE_S, then Prefect's repossessor: up to ~75 s). 240 steps (~1 s each on
    # 2 cores) keep the job training through that, the worker's restart and the rerun's shard step.
    job = TrainingRun(stack, tmp_path, monkeypatch, model="ldm-stack-kill-worker", steps=240, every=10,
                      lock_wait_s=240)
    run_id, _ = job.wait_for_checkpoint()
    phases["flow run start -> first verified checkpoint"] = time.monotonic() - t0

    t0 = time.monotonic()
    worker = psutil.Process(records(stack)["worker"]["pid"])
    doomed = [*worker.children(recursive=True), worker]
    flow_runs = [p for p in doomed if "prefect.engine" in " ".join(p.cmdline()) or p.ppid() == worker.pid]
    assert flow_runs, "no flow-run process under the worker"
    for proc in doomed:
        proc.kill()
    psutil.wait_procs(doomed, timeout=30)
    at_kill = max(job.loss_steps(run_id), default=0)
    sid = submission_id(job.key)
    assert [(a.submission_id, a.status) for a in job.jobs()] == [(sid, "RUNNING")], "the job died with the worker"
    assert at_kill < job.steps
    up = stack_cmd("up", folder=stack.folder)
    assert up.returncode == 0 and "worker     up in" in up.stdout, up.stdout + up.stderr
    phases["worker killed -> new worker up"] = time.monotonic() - t0
    # Nothing reports the dead flow run: `ldmflow deploy`'s automation crashes it once its heartbeats stop
    # (3 x the stack's 30 s).
    crashed = wait_state(stack, job.flow_run_id, "CRASHED", timeout=240)
    phases["worker killed -> flow run CRASHED by the automation"] = time.monotonic() - t0
    assert "no heartbeat for 90 s" in (crashed.state.message or ""), crashed.state

    t0 = time.monotonic()
    job.rerun()
    rerun = wait_final(stack, job.flow_run_id, timeout=900)
    phases["rerun -> flow run completed"] = time.monotonic() - t0
    assert rerun.state.is_completed(), f"{rerun.state.name}: {rerun.state.message}"
    assert [(a.submission_id, a.status) for a in job.jobs()] == [(sid, "SUCCEEDED")]
    assert job.logs(f"re-attaching to Ray job {sid}"), "the rerun did not follow the running job"
    from mlflow import MlflowClient

    run = MlflowClient(stack.urls()["mlflow"]).get_run(run_id)
    assert "resumes" not in run.data.tags, run.data.tags  # followed, never restarted or resumed
    steps = job.loss_steps(run_id)
    assert sorted(steps) == list(range(1, job.steps + 1)), "steps were trained twice or skipped"
    assert max(steps) > at_kill
    for phase, seconds in phases.items():
        print(f"{phase}: {seconds:.1f} s")


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
