"""prefect.yaml as `ldmflow deploy` reads it, `--param` parsing, and the commands' one-line refusals when no
server is configured. No server here: tests/infra/test_local_stack.py deploys and runs against a real one."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.deployments import PREFECT_FILE, DeployError, flow_exists, load_specs, parse_params
from pipelines.events import NEW_ITEMS_EVENT, dataset_resource, emit_new_items

ROOT = Path(__file__).resolve().parents[2]


def test_retrain_is_scheduled_triggered_by_new_items_and_never_runs_twice():
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.schedules import Schedule
    from pydantic import TypeAdapter

    from pipelines.deployments import _schedule

    specs = {s.name: s for s in load_specs(PREFECT_FILE)}
    retrain = specs["retrain"]
    assert retrain.entrypoint == "pipelines/flows.py:retrain_flow"
    assert {"source", "dataset", "config"} <= set(retrain.parameters)
    assert [Schedule(**_schedule(s)).cron for s in retrain.schedules] == ["0 3 * * *"]
    assert retrain.concurrency_limit == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    (trigger,) = [TypeAdapter(DeploymentTriggerTypes).validate_python(t) for t in retrain.triggers]
    assert trigger.expect == {NEW_ITEMS_EVENT}
    # The trigger matches the resource the sensor's events name, whatever the dataset.
    pattern = trigger.match.model_dump()["prefect.resource.id"]
    for dataset in ("s3://ldm-data/datasets/main", "/data/sets/a b"):
        assert fnmatch.fnmatch(dataset_resource(dataset)["prefect.resource.id"], pattern)
    assert trigger.parameters == {"source": "{{ event.payload.source }}", "dataset": "{{ event.payload.dataset }}"}
    # Every entry builds: schedules and triggers are what Prefect's own types accept.
    for spec in specs.values():
        [Schedule(**_schedule(s)) for s in spec.schedules]
        [TypeAdapter(DeploymentTriggerTypes).validate_python(t) for t in spec.triggers]
    assert flow_exists(specs["watch-source"].entrypoint)


def test_flow_exists_reads_the_file_without_importing_it(tmp_path):
    (tmp_path / "flows.py").write_text("import no_such_module\n\ndef a_flow():\n    pass\n\nb_flow = a_flow\n")
    assert flow_exists("flows.py:a_flow", tmp_path)
    assert flow_exists("flows.py:b_flow", tmp_path)
    assert not flow_exists("flows.py:c_flow", tmp_path)
    assert not flow_exists("missing.py:a_flow", tmp_path)


def test_parse_params_reads_values_as_yaml():
    assert parse_params(["n=3", "x=0.5", "ok=true", "tags=[a, b]", "s=s3://b/p", "empty=", "text=a: b",
                         "m={a: 1}"]) == {
        "n": 3, "x": 0.5, "ok": True, "tags": ["a", "b"], "s": "s3://b/p", "empty": "", "text": "a: b", "m": {"a": 1}}
    with pytest.raises(DeployError, match="KEY=VALUE"):
        parse_params(["novalue"])


def test_bad_prefect_files_are_named(tmp_path):
    with pytest.raises(DeployError, match="not found"):
        load_specs(tmp_path / "prefect.yaml")
    (tmp_path / "prefect.yaml").write_text("deployments:\n  - name: x\n    entrypoint: flows:x\n"
                                           "    work_pool: {name: p}\n")
    with pytest.raises(DeployError, match="deployment `x`: entrypoint must be path/to/file.py:function"):
        load_specs(tmp_path / "prefect.yaml")


def test_emit_new_items_emits_nothing_when_nothing_is_new():
    assert emit_new_items("/data/set", "/data/raw", 0) is None
    with pytest.raises(ValueError, match="new_items must be >= 0"):
        emit_new_items("/data/set", "/data/raw", -1)


@pytest.mark.parametrize("args", [["deploy"], ["run", "retrain", "--param", "source=/x"]])
def test_deploy_and_run_need_a_server_and_say_so_in_one_line(args, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "PREFECT_API_URL is not set" in lines[0], proc.stderr


def test_every_deployment_names_a_real_flow_and_valid_parameters():
    """prefect.yaml and the flows change separately: a parameter a flow no longer takes (or one it
    refuses) would fail every scheduled and triggered run, long after the change."""
    from prefect.flows import load_flow_from_entrypoint

    for spec in load_specs(PREFECT_FILE):
        flow = load_flow_from_entrypoint(spec.entrypoint)
        # Templated values ({{ event.payload.x }}) are filled when the trigger fires: check their names only.
        given = {k: v for k, v in spec.parameters.items() if not (isinstance(v, str) and "{{" in v)}
        unknown = set(spec.parameters) - set(flow.parameters.properties)
        assert not unknown, f"{spec.name}: {spec.entrypoint} takes no {sorted(unknown)}"
        flow.validate_parameters({**_required_stand_ins(flow, given), **given})
        for trigger in spec.triggers:
            assert set(trigger.get("parameters") or {}) <= set(flow.parameters.properties), spec.name


def _required_stand_ins(flow, given: dict) -> dict:
    # Required parameters a deployment leaves to the caller (`ldmflow run --param`): a valid stand-in each,
    # so that validation judges only the values the file sets.
    stand_ins = {"string": "runs", "integer": 1, "number": 1.0, "boolean": False}
    out = {}
    for name in flow.parameters.required or []:
        if name not in given:
            kind = flow.parameters.properties[name].get("type", "string")
            out[name] = stand_ins.get(kind, "runs")
    return out


def test_unresponsive_flow_runs_are_crashed_after_missed_heartbeats(monkeypatch):
    """The automation `ldmflow deploy` creates: after a flow run's heartbeat, no heartbeat or final state within
    the window -> that flow run (each one on its own) is marked CRASHED. The window defaults to three heartbeats
    of this environment's frequency; one a live run could not meet is refused before anything is deployed.
    (tests/infra/test_local_stack.py sees a killed worker's flow run crashed by it on a real server.)"""
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import Posture
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.deployments import CRASH_AUTOMATION, crash_automation, default_crash_after_s, deploy

    automation = crash_automation(90)
    trigger = automation.trigger
    assert automation.name == CRASH_AUTOMATION
    assert trigger.posture == Posture.Proactive and trigger.within.total_seconds() == 90
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                              "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}
    assert trigger.for_each == {"prefect.resource.id"}
    assert [a.state for a in automation.actions] == [StateType.CRASHED]

    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    assert default_crash_after_s() == 90
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), \
            pytest.raises(DeployError, match="--crash-after 30: flow runs send a heartbeat every 30 s"):
        deploy(crash_after_s=30)  # refused before the (absent) server is asked
