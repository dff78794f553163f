"""A real local stack on 127.0.0.1, as plain processes from the project's environment (no Docker):

    seaweedfs   `weed mini`: S3 with enforced credentials; buckets `mlflow` (artifacts) and `ldm-data`
    mlflow      `mlflow server`: SQLite store, artifacts on SeaweedFS through the server's proxy
    prefect     `prefect server start`: API, UI, and the services the temporary server lacks (scheduler,
                automations), its own PREFECT_HOME in the stack folder
    worker      `prefect worker start --type process` polling the work pool; flow runs are its children
                and inherit the stack's environment (MLflow, S3, Ray)
    ray-head    `ray start --head --block` with the dashboard (the Ray Jobs API)
    ray-node    `ray start --address ... --block`: a second node with its own temp folder and HOME
                (both nodes have the stack's S3 credentials and run training jobs with this Python)

`up` starts what is not running (twice is harmless; the S3 -> MLflow, Prefect -> worker and Ray head -> node
chains side by side), waits until each answers, and prints the URLs and the `export` lines; `status` asks
each; `down` stops each (SIGTERM to its process group, a Ray node's leading process first, SIGKILL after a
grace period). Pids, ports, logs and data live in the stack folder (`runs/stack` by default), so a later
`up` comes back on the same ports with the same data.

Each service runs in a process group of its own (start_new_session), and only that group is signalled:
`ray stop` would kill every Ray process of the user on this machine, including other people's clusters.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

WORK_POOL = "ldmflow-process"
"""The process work pool the worker polls; prefect.yaml and the compose worker use the same name."""
BUCKETS = ("mlflow", "ldm-data")
"""MLflow's artifact bucket and the data/checkpoint bucket, as in infra/compose."""
GRPC_OFFSET = 10000
"""SeaweedFS dials a component's gRPC port as its HTTP port + 10000 (whatever -*.port.grpc says), so each
component takes a pair of free ports p, p + 10000."""
SERVICES = ("seaweedfs", "mlflow", "prefect", "worker", "ray-head", "ray-node")
"""Start order; `down` stops them in reverse (flow runs first, storage last)."""
NEEDS = {"mlflow": "seaweedfs", "worker": "prefect", "ray-node": "ray-head"}
"""The service each one must find answering when it starts (MLflow's artifacts bucket, the worker's API, the
second node's head); the three chains start side by side."""


class StackError(Exception):
    """A service that did not start or answer; the message names it and its log."""


# --- configuration --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class StackConfig:
    folder: Path
    """State (stack.json), logs and every service's data."""
    ports: dict[str, int] = field(default_factory=dict)
    """Requested ports by name (prefect, mlflow, s3, ray, dashboard); any other is picked free."""
    work_pool: str = WORK_POOL
    """Process work pool of the worker (created by the worker if missing)."""
    s3_access_key: str = "ldmflow"
    s3_secret_key: str = ""
    """Empty: a random secret made on the first `up` and kept in stack.json (mode 600)."""
    ray_cpus_per_node: int = 1
    """CPUs each of the two Ray nodes offers (2 nodes x 1 CPU: a 2-worker training run fits)."""
    startup_timeout: float = 180.0
    """Seconds `up` waits for each service to answer."""
    stop_timeout: float = 30.0
    """Seconds `down` waits after SIGTERM before SIGKILL."""
    project_root: Path = Path(__file__).resolve().parents[2]
    """Working directory of the worker (flow runs import the project from here)."""

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        for name, port in self.ports.items():
            if not 0 <= int(port) < 65536:
                raise ValueError(f"stack port `{name}` must be 0-65535, got {port}")
        if self.ray_cpus_per_node < 1:
            raise ValueError(f"stack `ray_cpus_per_node` must be >= 1, got {self.ray_cpus_per_node}")
        if not self.work_pool:
            raise ValueError("stack `work_pool` must be a name, got an empty string")


def default_folder() -> Path:
    from training.locations import runs_dir

    return runs_dir() / "stack"


# --- ports and processes --------------------------------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(taken: set[int], *, pair: bool = False) -> int:
    """A free port on 127.0.0.1 not in `taken` (with `pair`, p + 10000 free too), in 20000-32000, below the
    usual ephemeral range, so ports handed out by the kernel to clients do not take it before its server
    binds it."""
    import random

    rng = random.Random()  # seeded from the OS: stacks and test sessions side by side pick different ports
    for _ in range(4000):
        port = rng.randrange(20000, 32000)
        wanted = (port, port + GRPC_OFFSET) if pair else (port,)
        if not taken.intersection(wanted) and all(port_free(p) for p in wanted):
            return port
    raise StackError("no free port on 127.0.0.1 in 20000-32000")


PAIRED = ("s3", "weed-master", "weed-volume", "weed-filer", "weed-admin")
SINGLE = ("mlflow", "prefect", "worker-health", "ray", "dashboard", "ray-client",
          "head-agent", "head-agent-grpc", "head-runtime-env", "head-metrics",
          "node-agent", "node-agent-grpc", "node-runtime-env", "node-metrics")


def assign_ports(requested: dict[str, int], previous: dict[str, int]) -> dict[str, int]:
    """Every port the stack needs: requested ones as given, then the last run's where still free (stable URLs
    across down/up), then free ones."""
    unknown = set(requested) - set(PAIRED) - set(SINGLE)
    if unknown:
        raise ValueError(f"unknown stack port name(s) {sorted(unknown)}; known: {', '.join(PAIRED + SINGLE)}")
    ports: dict[str, int] = {k: int(v) for k, v in requested.items() if v}
    taken = set(ports.values()) | {p + GRPC_OFFSET for k, p in ports.items() if k in PAIRED}
    for name in PAIRED + SINGLE:
        if name in ports:
            continue
        old = previous.get(name)
        pair = name in PAIRED
        if old and old not in taken and all(port_free(p) for p in ((old, old + GRPC_OFFSET) if pair else (old,))):
            ports[name] = old
        else:
            ports[name] = free_port(taken, pair=pair)
        taken.update((ports[name], ports[name] + GRPC_OFFSET) if pair else (ports[name],))
    return ports


def alive(record: dict | None) -> bool:
    """The recorded process still runs, and is the one we started (a reused pid has another start time)."""
    if not record:
        return False
    try:
        proc = psutil.Process(record["pid"])
        return abs(proc.create_time() - record["create_time"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_group(record: dict, timeout: float, *, leader_first: bool = False) -> str:
    """SIGTERM the service's process group, SIGKILL what is left after `timeout`; returns how it ended.

    `leader_first`: SIGTERM the group's leader alone and give it the time to stop its own children before the
    rest of the group is signalled (`ray start --block` drains its node through the GCS on SIGTERM: with the
    GCS signalled at the same moment, that drain waits out its whole 30 s timeout on a dead server)."""
    if not alive(record):
        return "not running"
    pgid = record["pid"]  # start_new_session: the service leads its own group
    members = _group(pgid)
    deadline = time.monotonic() + timeout
    if leader_first:
        os.kill(pgid, signal.SIGTERM)
        psutil.wait_procs([p for p in members if p.pid == pgid], timeout=timeout)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:  # the leader took every member with it
        pass
    _gone, left = psutil.wait_procs(members, timeout=max(0.0, deadline - time.monotonic()))
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in left:  # a child that left the group (setsid) was still ours: it was in it at SIGTERM
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        return f"killed after {timeout:.0f} s"
    return "stopped"


def _group(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 3) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.HTTPError):
        return False


# --- the stack ------------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    command: Callable[[], list[str]]
    env: Callable[[], dict[str, str]]
    healthy: Callable[[], str | None]
    """None when the service answers as it should, else what is wrong."""
    url: Callable[[], str]
    cwd: Callable[[], Path] | None = None
    stop_timeout: float | None = None
    """Seconds between SIGTERM and SIGKILL when not the stack's default."""
    stop_leader_first: bool = False
    """SIGTERM the leading process alone first (see stop_group)."""


class Stack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.folder = config.folder
        self.state_path = self.folder / "stack.json"
        self.state = self._load()

    # -- state

    def _load(self) -> dict:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"ports": {}, "services": {}}

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.chmod(tmp, 0o600)  # it holds the S3 secret and the Ray token
        tmp.replace(self.state_path)

    @property
    def ports(self) -> dict[str, int]:
        return self.state["ports"]

    def _secrets(self) -> None:
        s = self.state.setdefault("secrets", {})
        s.setdefault("s3_access_key", self.config.s3_access_key)
        if self.config.s3_secret_key:
            s["s3_secret_key"] = self.config.s3_secret_key
        s.setdefault("s3_secret_key", secrets.token_hex(16))
        s.setdefault("ray_auth_token", secrets.token_hex(32))

    # -- what clients use

    def urls(self) -> dict[str, str]:
        p = self.ports
        return {"prefect": f"http://127.0.0.1:{p['prefect']}", "prefect_api": f"http://127.0.0.1:{p['prefect']}/api",
                "mlflow": f"http://127.0.0.1:{p['mlflow']}", "s3": f"http://127.0.0.1:{p['s3']}",
                "ray": f"127.0.0.1:{p['ray']}", "ray_dashboard": f"http://127.0.0.1:{p['dashboard']}"}

    def client_env(self) -> dict[str, str]:
        """What a client of the stack exports (and what the worker's flow runs get)."""
        s, u = self.state["secrets"], self.urls()
        return {
            "PREFECT_API_URL": u["prefect_api"],
            "MLFLOW_TRACKING_URI": u["mlflow"],
            "AWS_ENDPOINT_URL": u["s3"],
            "AWS_ACCESS_KEY_ID": s["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": s["s3_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            # Flow runs' heartbeat (Prefect's default: 180 s); `ldmflow deploy` crashes a run silent for three
            # (pipelines.deployments.CRASH_AUTOMATION), so a run whose worker died is Crashed in 90 s.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            # Two nodes: checkpoints must be where both reach (the trainer refuses node-local storage).
            "LDMFLOW_STORAGE": "s3://ldm-data/ray",
            "RAY_ADDRESS": u["ray"],
            # `ray job submit` and JobSubmissionClient read this one (RAY_ADDRESS is the GCS for ray.init).
            "RAY_API_SERVER_ADDRESS": u["ray_dashboard"],
            # Ray 2.60 clients send the cluster's token only in token mode.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": s["ray_auth_token"],
        }

    def exports(self) -> str:
        return "\n".join(f"export {k}={v}" for k, v in self.client_env().items())

    def _base_env(self) -> dict[str, str]:
        """The caller's environment without anything that points elsewhere (another stack's or cloud's
        settings must not leak into a service)."""
        drop = ("AWS_", "MLFLOW_", "PREFECT_", "RAY_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        # The project's environment first on PATH, activated or not: a Ray Job's entrypoint is a bare `python -m
        # ...` that the node resolves on its PATH (without this, `ldmflow train --submit` from a shell that did
        # not activate .venv ran the system Python: "No module named 'torch'").
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env.update(PREFECT_HOME=str(self.folder / "prefect"), MLFLOW_DISABLE_TELEMETRY="true",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", RAY_USAGE_STATS_ENABLED="0")
        return env

    # -- services

    def services(self) -> dict[str, Service]:
        bin_dir = Path(sys.executable).parent
        p, f, s, u = self.ports, self.folder, self.state["secrets"], self.urls()

        def exe(name: str) -> str:
            beside = bin_dir / name
            return str(beside) if beside.exists() else (shutil.which(name) or name)

        def s3_env() -> dict[str, str]:
            return {**self._base_env(), "AWS_ACCESS_KEY_ID": s["s3_access_key"],
                    "AWS_SECRET_ACCESS_KEY": s["s3_secret_key"]}

        def weed_cmd() -> list[str]:
            (f / "seaweedfs").mkdir(parents=True, exist_ok=True)
            return [exe("weed"), "mini", f"-dir={f / 'seaweedfs'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    *(f"-{flag}.port={p[name]}" for flag, name in (("s3", "s3"), ("master", "weed-master"),
                                                                   ("volume", "weed-volume"), ("filer", "weed-filer"),
                                                                   ("admin", "weed-admin"))),
                    *(f"-{flag}.port.grpc={p[name] + GRPC_OFFSET}"
                      for flag, name in (("s3", "s3"), ("master", "weed-master"), ("volume", "weed-volume"),
                                         ("filer", "weed-filer"), ("admin", "weed-admin"))),
                    f"-filer.localSocket={f / 'seaweedfs' / 'filer.sock'}",
                    f"-s3.localSocket={f / 'seaweedfs' / 's3.sock'}",
                    "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                    "-master.telemetry=false", "-volume.max=200", "-master.volumeSizeLimitMB=256"]

        def mlflow_env() -> dict[str, str]:
            return {**s3_env(), "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": u["s3"],
                    "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "path",
                    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
                    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                    "AWS_EC2_METADATA_DISABLED": "true"}

        def mlflow_cmd() -> list[str]:
            (f / "mlflow").mkdir(parents=True, exist_ok=True)
            return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(p["mlflow"]),
                    "--workers", "1", "--backend-store-uri", f"sqlite:///{f / 'mlflow' / 'mlflow.db'}",
                    "--artifacts-destination", "s3://mlflow", "--serve-artifacts"]

        def prefect_env() -> dict[str, str]:
            (f / "prefect").mkdir(parents=True, exist_ok=True)
            return {**self._base_env(), "PREFECT_UI_API_URL": u["prefect_api"],
                    "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(p["prefect"])}

        def worker_env() -> dict[str, str]:
            env = {**self._base_env(), **self.client_env(), "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                   "PREFECT_WORKER_WEBSERVER_PORT": str(p["worker-health"]),
                   # Poll every 5 s (default 10): `ldmflow run` and triggered runs start sooner.
                   "PREFECT_WORKER_QUERY_SECONDS": "5",
                   # Flow runs import this checkout's packages (an editable install may point at another).
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(self.config.project_root),
                                                                os.environ.get("PYTHONPATH")])),
                   "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                   "AWS_EC2_METADATA_DISABLED": "true"}
            if "LDMFLOW_RUNS_DIR" not in os.environ:
                env["LDMFLOW_RUNS_DIR"] = str(f / "runs")  # flow runs' local state stays in the stack folder
            return env

        def ray_env(node: str) -> dict[str, str]:
            home = f / "ray" / node / "home"
            (home / "tmp").mkdir(parents=True, exist_ok=True)
            env = {**self._base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": s["ray_auth_token"],
                   # A training job's driver and workers import this checkout (as the worker's flow runs do).
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(self.config.project_root),
                                                                os.environ.get("PYTHONPATH")]))}
            # Every node has the stack's S3 credentials, as every node of a cluster has its instance role:
            # a training job (pipelines' train task) carries no credential, and its workers on either node
            # write checkpoints to S3.
            env.update({k: v for k, v in self.client_env().items() if k.startswith("AWS_")})
            if node != "head":  # otherwise the second node shares nothing with the first (but the op cache)
                env.update(HOME=str(home), TMPDIR=str(home / "tmp"), TORCH_EXTENSIONS_DIR=os.environ.get(
                    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")))
            return env

        def ray_cmd(node: str) -> list[str]:
            # Short temp paths: Ray's unix socket paths have a length limit (~107 bytes).
            temp = self.ray_temp(node)  # made by `ray start`, removed by `down`
            prefix = "head" if node == "head" else "node"
            common = ["start", "--block", f"--num-cpus={self.config.ray_cpus_per_node}", "--num-gpus=0",
                      f"--temp-dir={temp}", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                      f"--dashboard-agent-listen-port={p[prefix + '-agent']}",
                      f"--dashboard-agent-grpc-port={p[prefix + '-agent-grpc']}",
                      f"--runtime-env-agent-port={p[prefix + '-runtime-env']}",
                      f"--metrics-export-port={p[prefix + '-metrics']}",
                      f'--resources={{"{node}_node": 1}}']
            if node == "head":
                return [exe("ray"), *common, "--head", f"--port={p['ray']}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dashboard']}",
                        f"--ray-client-server-port={p['ray-client']}"]
            return [exe("ray"), *common, f"--address=127.0.0.1:{p['ray']}"]

        return {
            "seaweedfs": Service("seaweedfs", weed_cmd, s3_env, self._s3_healthy, lambda: u["s3"],
                                 cwd=lambda: f / "seaweedfs"),
            "mlflow": Service("mlflow", mlflow_cmd, mlflow_env,
                              lambda: None if http_ok(u["mlflow"] + "/health") else "no answer on /health",
                              # Its web server exits at once on SIGTERM, its job runner up to 30 s later, for
                              # nothing: the SQLite store is committed per request.
                              lambda: u["mlflow"], stop_timeout=5),
            "prefect": Service("prefect", lambda: [exe("prefect"), "server", "start", "--host", "127.0.0.1",
                                                   "--port", str(p["prefect"])], prefect_env,
                               lambda: None if http_ok(u["prefect_api"] + "/health") else "no answer on /api/health",
                               lambda: u["prefect"]),
            "worker": Service("worker", lambda: [exe("prefect"), "worker", "start", "--pool", self.config.work_pool,
                                                 "--type", "process", "--with-healthcheck"], worker_env,
                              self._worker_healthy, lambda: f"pool {self.config.work_pool}",
                              cwd=lambda: self.config.project_root),
            "ray-head": Service("ray-head", lambda: ray_cmd("head"), lambda: ray_env("head"), self._ray_healthy,
                                lambda: u["ray"], stop_leader_first=True),
            "ray-node": Service("ray-node", lambda: ray_cmd("second"), lambda: ray_env("second"),
                                lambda: self._ray_healthy(nodes=2), lambda: "second node", stop_leader_first=True),
        }

    def ray_temp(self, node: str) -> Path:
        """Ray's temp folder for a node: short (socket paths), unique to this stack, removed by `down`."""
        import hashlib

        tag = hashlib.sha256(str(self.folder).encode()).hexdigest()[:8]
        return Path("/tmp") / f"ldmstack-{tag}-{node}"

    # -- health checks

    def _s3_healthy(self) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.s3_client()
        try:
            for bucket in BUCKETS:  # idempotent: `up` on an existing store finds them
                try:
                    client.head_bucket(Bucket=bucket)
                except ClientError as e:
                    if e.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
                        raise
                    client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=BUCKETS[1], Key=".stack-probe", Body=b"probe")
            client.delete_object(Bucket=BUCKETS[1], Key=".stack-probe")
        except (BotoCoreError, ClientError) as e:  # connection refused, 503 while the filer starts
            return f"S3 not ready: {type(e).__name__}: {str(e)[:200]}"
        return None

    def s3_client(self):
        import boto3
        from botocore.config import Config

        s = self.state["secrets"]
        return boto3.session.Session().client(
            "s3", endpoint_url=self.urls()["s3"], region_name="us-east-1",
            aws_access_key_id=s["s3_access_key"], aws_secret_access_key=s["s3_secret_key"],
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5,
                          request_checksum_calculation="when_required", response_checksum_validation="when_required",
                          s3={"addressing_style": "path"}))

    def _worker_healthy(self) -> str | None:
        if not http_ok(f"http://127.0.0.1:{self.ports['worker-health']}/health"):
            return "no answer on its health port"
        # The worker creates its pool when it first polls; the pool must exist before anything deploys to it.
        req = urllib.request.Request(f"{self.urls()['prefect_api']}/work_pools/{self.config.work_pool}")
        try:
            with urllib.request.urlopen(req, timeout=3) as r:
                pool = json.loads(r.read())
        except (OSError, urllib.error.HTTPError):
            return f"work pool {self.config.work_pool} not there yet"
        return None if pool.get("status") == "READY" else f"work pool {self.config.work_pool} is {pool.get('status')}"

    def _ray_healthy(self, nodes: int = 1) -> str | None:
        """The dashboard (Jobs API) answers, and the cluster has `nodes` alive nodes."""
        token = self.state["secrets"]["ray_auth_token"]
        url = f"{self.urls()['ray_dashboard']}/nodes?view=summary"
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                summary = json.loads(r.read())["data"]["summary"]
        except (OSError, urllib.error.HTTPError, KeyError, ValueError) as e:
            return f"dashboard not answering: {e}"
        alive_nodes = sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")
        return None if alive_nodes >= nodes else f"{alive_nodes} of {nodes} nodes alive"

    # -- commands

    def up(self, log: Callable[[str], None] = print) -> dict[str, str]:
        """Start every service that is not running, each once the one it needs answers (NEEDS)."""
        records = self.state["services"]
        running = {name for name in SERVICES if alive(records.get(name))}
        if running != set(SERVICES):
            # Ports: keep the running services' ones, re-pick (or re-use) the others'.
            keep = dict(self.ports) if running else {}
            self.state["ports"] = assign_ports({**self.config.ports, **keep}, self.ports)
        self._secrets()
        self._save()
        services = self.services()
        for name in SERVICES:
            if name in running:
                log(f"{name:10s} already running (pid {records[name]['pid']})")
        # Each service starts once the one it needs answers (NEEDS), not after every service before it: `up`
        # takes as long as its slowest chain instead of the sum of all the starts (most of which wait on I/O
        # and imports).
        answering, started = set(running), {}
        waiting = [name for name in SERVICES if name not in running]
        while waiting or started:
            for name in [n for n in waiting if NEEDS.get(n) is None or NEEDS[n] in answering]:
                waiting.remove(name)
                self._start(services[name])
                started[name] = time.monotonic()
            for name, t0 in list(started.items()):
                if self._check(services[name], t0):
                    log(f"{name:10s} up in {time.monotonic() - t0:5.1f} s  {services[name].url()}")
                    answering.add(name)
                    del started[name]
            if started and not any(NEEDS.get(n) in answering for n in waiting):
                time.sleep(0.5)
        return self.urls()

    def _start(self, service: Service) -> None:
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{service.name}.log"
        with open(log_path, "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(service.command(), env=service.env(), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=str(service.cwd() if service.cwd else self.folder))
        self.state["services"][service.name] = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
                                                "log": str(log_path), "command": service.command()}
        self._save()

    def _check(self, service: Service, started: float) -> bool:
        """Whether the service started at `started` (monotonic) answers yet; raises when it exited or
        did not answer within the startup timeout."""
        record = self.state["services"][service.name]
        if not alive(record):
            raise StackError(f"{service.name} exited while starting; see {record['log']}:\n{self._tail(record)}")
        problem = service.healthy()
        if problem is None:
            return True
        if time.monotonic() - started > self.config.startup_timeout:
            raise StackError(f"{service.name} not healthy after {self.config.startup_timeout:.0f} s ({problem}); "
                             f"see {record['log']}:\n{self._tail(record)}")
        return False

    @staticmethod
    def _tail(record: dict, lines: int = 15) -> str:
        path = Path(record["log"])
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def status(self) -> dict[str, str]:
        """Each service: `up`, `down` (not running), or `unhealthy: why` (running but not answering)."""
        report: dict[str, str] = {}
        if "secrets" not in self.state or not self.ports:
            return {name: "down" for name in SERVICES}
        services = self.services()
        for name in SERVICES:
            if not alive(self.state["services"].get(name)):
                report[name] = "down"
            else:
                problem = services[name].healthy()
                report[name] = "up" if problem is None else f"unhealthy: {problem}"
        return report

    def down(self, log: Callable[[str], None] = print) -> None:
        services = self.services() if self.ports and "secrets" in self.state else {}
        for name in reversed(SERVICES):
            record = self.state["services"].get(name)
            if record:
                timeout = getattr(services.get(name), "stop_timeout", None) or self.config.stop_timeout
                leader_first = getattr(services.get(name), "stop_leader_first", False)
                log(f"{name:10s} {stop_group(record, timeout, leader_first=leader_first)}")
        self.state["services"] = {}
        self._save()
        for node in ("head", "second"):
            shutil.rmtree(self.ray_temp(node), ignore_errors=True)
            if self.ray_temp(node).exists():  # a file written by a process as it exited
                time.sleep(1)
                shutil.rmtree(self.ray_temp(node), ignore_errors=True)
        # weed leaves gRPC sockets named by port in the system temp folder (no flag moves them).
        for name in PAIRED:
            port = self.ports.get(name)
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock") if port else ():
                sock.unlink(missing_ok=True)


# --- command line ---------------------------------------------------------------------------------


def parse_port(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"--port takes NAME=PORT (e.g. prefect=4200), got {text!r}")
    return name, int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/local/stack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--dir", type=Path, help="state, logs and data (default: runs/stack under LDMFLOW_RUNS_DIR)")
    parser.add_argument("--port", action="append", type=parse_port, default=[], metavar="NAME=PORT",
                        help="a fixed port (prefect, mlflow, s3, ray, dashboard, ...); "
                             "others are picked free (and kept across down/up while free)")
    parser.add_argument("--pool", default=WORK_POOL, help="the worker's process work pool (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each service")
    args = parser.parse_args(argv)
    try:
        config = StackConfig(folder=args.dir or default_folder(), ports=dict(args.port), work_pool=args.pool,
                             startup_timeout=args.timeout)
        stack = Stack(config)
        if args.command == "up":
            try:
                stack.up()
            except BaseException:
                print("stopping what started (infra/local/stack down to retry)", file=sys.stderr)
                stack.down(log=lambda line: print(line, file=sys.stderr))
                raise
            print_urls(stack)
        elif args.command == "status":
            report = stack.status()
            for name, state in report.items():
                print(f"{name:10s} {state}")
            if any(state != "up" for state in report.values()):
                return 1
            print_urls(stack)
        elif args.command == "env":
            if not stack.ports:
                raise StackError(f"no stack in {config.folder}: run `infra/local/stack up` first")
            print(stack.exports())
        else:
            stack.down()
    except (StackError, ValueError) as e:
        print(f"stack {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def print_urls(stack: Stack) -> None:
    u = stack.urls()
    print(f"\nPrefect UI   {u['prefect']}\nMLflow UI    {u['mlflow']}\nS3           {u['s3']} "
          f"(buckets {', '.join(BUCKETS)})\nRay          {u['ray']} (dashboard {u['ray_dashboard']})\n"
          f"state, logs  {stack.folder}\n\n# to use it from a shell (or: eval \"$(infra/local/stack env)\"):")
    print(stack.exports())


if __name__ == "__main__":
    sys.exit(main())
