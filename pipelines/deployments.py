"""`ldmflow deploy` and `ldmflow run`: prefect.yaml's deployments onto a Prefect server, and a deployment's
run started, watched and reported, for people who do not know Prefect.

Why deploy programmatically (`flow.from_source(...).deploy(...)`) rather than through `prefect deploy`:
prefect.yaml stays the one description (in Prefect's own schema, for `prefect deploy --all` too; that path
is not tested here), but read here each deployment can be checked and deployed on its own: a flow that this
checkout does not have yet is reported by name instead of stopping the others, a missing work pool or an
unreachable server is one line, and nothing prompts, builds an image or pushes code anywhere (offline:
`from_source` on the local checkout makes the pull step "set the working directory to this checkout",
which is where the process worker runs flow runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"


class DeployError(Exception):
    """Bad input to deploy or run (a missing server, deployment, flow or parameter); one line."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of prefect.yaml's `deployments`, as this module uses it."""

    name: str
    entrypoint: str
    work_pool: str
    parameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    tags: tuple[str, ...] = ()
    schedules: tuple[dict, ...] = ()
    triggers: tuple[dict, ...] = ()
    concurrency_limit: dict | int | None = None

    def __post_init__(self) -> None:
        if ":" not in self.entrypoint or not self.entrypoint.split(":", 1)[0].endswith(".py"):
            raise DeployError(f"deployment `{self.name}`: entrypoint must be path/to/file.py:function, "
                              f"got {self.entrypoint!r}")
        if not self.work_pool:
            raise DeployError(f"deployment `{self.name}`: work_pool.name is required")


def load_specs(prefect_file: Path = PREFECT_FILE) -> list[DeploymentSpec]:
    """The deployments of a prefect.yaml."""
    if not Path(prefect_file).is_file():
        raise DeployError(f"{prefect_file} not found; run from the repository or pass --prefect-file")
    doc = yaml.safe_load(Path(prefect_file).read_text()) or {}
    specs = []
    for entry in doc.get("deployments") or []:
        name = entry.get("name") or "?"
        pool = (entry.get("work_pool") or {}).get("name", "")
        specs.append(DeploymentSpec(
            name=name, entrypoint=entry.get("entrypoint", ""), work_pool=pool,
            parameters=dict(entry.get("parameters") or {}), description=entry.get("description") or "",
            tags=tuple(entry.get("tags") or ()), schedules=tuple(entry.get("schedules") or ()),
            triggers=tuple(entry.get("triggers") or ()), concurrency_limit=entry.get("concurrency_limit")))
    if not specs:
        raise DeployError(f"{prefect_file} defines no deployments")
    return specs


def require_server() -> str:
    """PREFECT_API_URL, checked to answer: without it Prefect would start a temporary server of its own,
    which runs no scheduler or worker and forgets everything when the command ends."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or ""  # the environment, else the active Prefect profile
    if not url:
        raise DeployError("PREFECT_API_URL is not set: point it at a Prefect server with a worker "
                          "(e.g. `eval \"$(infra/local/stack env)\"` after `infra/local/stack up`)")
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10):
            pass
    except OSError as e:
        raise DeployError(f"the Prefect server at PREFECT_API_URL={url} does not answer ({e})") from None
    return url


def flow_exists(entrypoint: str, root: Path = PROJECT_ROOT) -> bool:
    """Whether the entrypoint's file defines that function (read, not imported: importing a flow module
    to find out would import training's dependencies, and fail on a missing one with another message)."""
    import ast

    path, func = entrypoint.split(":", 1)
    file = root / path
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text())
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Assign)) and (
        getattr(node, "name", None) == func or any(getattr(t, "id", None) == func for t in getattr(node, "targets", [])))
        for node in tree.body)


@dataclass
class DeployResult:
    deployed: dict[str, str] = field(default_factory=dict)
    """Deployment name -> id."""
    missing: dict[str, str] = field(default_factory=dict)
    """Deployment name -> why it was not deployed."""
    crash_after_s: float = 0.0
    """The unresponsive-run automation's window (CRASH_AUTOMATION)."""


CRASH_AUTOMATION = "ldmflow-crash-unresponsive-flow-runs"
"""A flow run whose process died with its worker (a machine lost, a container evicted) would stay Running
on a self-hosted server for ever: nothing there notices. Flow runs of deployments send a heartbeat event
every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds; this automation marks one CRASHED when its heartbeats stop
without a final state. A crashed run can then be rerun (its training job is found again: pipelines.tasks)
and its concurrency slot is freed. Prefect documents this recipe for self-hosted servers (Cloud has it
built in): docs.prefect.io/v3/advanced/detect-zombie-flows."""
HEARTBEATS_MISSED = 3
"""Heartbeats a flow run may miss before the automation crashes it."""


def default_crash_after_s() -> float:
    """HEARTBEATS_MISSED heartbeats of this environment's PREFECT_FLOWS_HEARTBEAT_FREQUENCY (the stack's
    `env` exports its workers' value; Prefect's default is 180 s)."""
    from prefect.settings import Settings

    return float(HEARTBEATS_MISSED * Settings().flows.heartbeat_frequency)  # read now, not at import


def crash_automation(within_s: float):
    """CRASH_AUTOMATION: after a flow run's heartbeat, expect another (or its end) within `within_s`."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    heartbeat = "prefect.flow-run.heartbeat"
    ends = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    # AutomationCore, what the API creates (prefect.automations.Automation adds an `id` the API refuses).
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=f"Mark a flow run CRASHED when no heartbeat or final state follows its last heartbeat within "
                    f"{within_s:.0f} s (its process is gone). Created by `ldmflow deploy`.",
        trigger=EventTrigger(after={heartbeat}, expect={heartbeat, *ends},
                             match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {within_s:.0f} s: the flow "
                                    "run's process is gone (its worker or machine died); rerun it to continue")],
    )


def ensure_crash_automation(within_s: float) -> None:
    """CRASH_AUTOMATION on the server, with this window: created, or replaced (one, never copies)."""
    from prefect.client.orchestration import get_client

    automation = crash_automation(within_s)
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(old.id)
        client.create_automation(automation)


def deploy(prefect_file: Path = PREFECT_FILE, only: list[str] | None = None, work_pool: str | None = None,
           root: Path = PROJECT_ROOT, crash_after_s: float | None = None) -> DeployResult:
    """Create or update the deployments of `prefect_file` (all, or those named in `only`) on PREFECT_API_URL's
    server, with their schedules, triggers (automations) and concurrency limits, and CRASH_AUTOMATION with a
    window of `crash_after_s` (default: default_crash_after_s()). `work_pool` overrides the file's pool.
    Deploying again updates them in place (same names), it does not add copies."""
    crash_after_s = default_crash_after_s() if crash_after_s is None else crash_after_s
    if crash_after_s <= 30:
        raise DeployError(f"--crash-after {crash_after_s:g}: flow runs send a heartbeat every 30 s at the most "
                          "often (PREFECT_FLOWS_HEARTBEAT_FREQUENCY), so a shorter window would crash live ones")
    require_server()
    specs = load_specs(prefect_file)
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise DeployError(f"no deployment named {', '.join(unknown)} in {prefect_file}; "
                              f"it has {', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in only]
    _require_pools({work_pool or s.work_pool for s in specs})
    result = DeployResult()
    for spec in specs:
        if not flow_exists(spec.entrypoint, root):
            result.missing[spec.name] = f"{spec.entrypoint} is not defined in this checkout"
            continue
        result.deployed[spec.name] = str(_deploy_one(spec, work_pool or spec.work_pool, root))
    ensure_crash_automation(crash_after_s)
    result.crash_after_s = crash_after_s
    return result


def _require_pools(pools: set[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for pool in sorted(pools):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                raise DeployError(f"work pool `{pool}` does not exist on {require_server()}; start a "
                                  f"worker for it (`prefect worker start --pool {pool} --type process`, which "
                                  "creates it; infra/local/stack up does)") from None


def _deploy_one(spec: DeploymentSpec, work_pool: str, root: Path):
    from prefect import Flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.schedules import Schedule
    from pydantic import TypeAdapter

    flow = Flow.from_source(source=str(root), entrypoint=spec.entrypoint)
    schedules = [Schedule(**_schedule(s)) for s in spec.schedules]
    triggers = [TypeAdapter(DeploymentTriggerTypes).validate_python(t) for t in spec.triggers]
    limit = spec.concurrency_limit
    if isinstance(limit, dict):
        limit = ConcurrencyLimitConfig(**limit)
    return flow.deploy(name=spec.name, work_pool_name=work_pool, build=False, push=False,
                       parameters=spec.parameters or None, description=spec.description or None,
                       tags=list(spec.tags) or None, schedules=schedules or None, triggers=triggers or None,
                       concurrency_limit=limit, print_next_steps=False, ignore_warnings=True)


def _schedule(spec: dict) -> dict:
    import datetime

    spec = dict(spec)
    if "interval" in spec and not isinstance(spec["interval"], datetime.timedelta):
        spec["interval"] = datetime.timedelta(seconds=float(spec["interval"]))
    return spec


# --- ldmflow run ----------------------------------------------------------------------------------


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`k=v` pairs; each value read as YAML (3 -> int, true -> bool, [a, b] -> list, {a: 1} -> dict, text stays
    text, "a: b" included)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeployError(f"--param takes KEY=VALUE, got {pair!r}")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        # "a: b" is a YAML mapping, but on a command line it is text (a caption); {a: b} is the mapping.
        params[key] = value if isinstance(parsed, dict) and not value.lstrip().startswith("{") else parsed
    return params


@dataclass(frozen=True)
class RunReport:
    deployment: str
    flow_run_id: str
    flow_run_name: str
    state: str
    message: str
    seconds: float


def find_deployment(client: Any, name: str) -> Any:
    """A deployment by `flow-name/deployment-name`, or by the deployment's name alone when it is unique."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            pass
        matches = []
    else:
        matches = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise DeployError(f"{len(matches)} deployments are named {name!r}; give FLOW-NAME/{name}")
    known = sorted(d.name for d in client.read_deployments())
    raise DeployError(f"no deployment {name!r} on {require_server()}; "
                      f"deployed: {', '.join(known) or 'none'} (run `ldmflow deploy`)")


def check_params(deployment: Any, params: dict[str, Any]) -> None:
    """Names first (the server ignores a misspelt one and runs with the default), then the server checks
    types and required values against the flow's signature when the run is created."""
    known = set((deployment.parameter_openapi_schema or {}).get("properties", {}))
    unknown = sorted(set(params) - known)
    if unknown:
        raise DeployError(f"deployment {deployment.name!r} has no parameter {', '.join(unknown)}; "
                          f"it takes {', '.join(sorted(known)) or 'none'}")


def run(name: str, params: dict[str, Any], *, wait: bool = True, timeout: float | None = None,
        poll: float = 2.0) -> RunReport:
    """Start a run of deployment `name` with `params` through the Prefect API; with `wait`, until it ends (or
    `timeout` seconds: then the report has the state it is in)."""
    import httpx
    from prefect.client.orchestration import get_client

    require_server()
    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        deployment = find_deployment(client, name)
        check_params(deployment, params)
        try:
            flow_run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
        except httpx.HTTPStatusError as e:  # the server's parameter validation (enforce_parameter_schema)
            try:
                detail = e.response.json().get("detail", str(e))
            except ValueError:
                detail = e.response.text or str(e)
            raise DeployError(f"deployment {deployment.name!r} refused the parameters: {_one_line(detail)}") from None
        while wait and not (flow_run.state and flow_run.state.is_final()):
            if timeout is not None and time.monotonic() - t0 > timeout:
                break
            time.sleep(poll)
            flow_run = client.read_flow_run(flow_run.id)
        state = flow_run.state
        return RunReport(deployment=deployment.name, flow_run_id=str(flow_run.id), flow_run_name=flow_run.name,
                         state=state.type.value if state else "UNKNOWN", message=(state.message or "") if state else "",
                         seconds=time.monotonic() - t0)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:400]
