"""`ldmflow deploy` and `ldmflow run`: thin commands over pipelines.deployments."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _quiet_http() -> None:
    # httpx logs every request at INFO, which would bury the one line these commands print.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def cmd_deploy(args: argparse.Namespace) -> int:
    from pipelines.deployments import CRASH_AUTOMATION, deploy

    _quiet_http()
    result = deploy(Path(args.prefect_file), only=args.only or None, work_pool=args.pool,
                    crash_after_s=args.crash_after)
    for name, deployment_id in result.deployed.items():
        print(f"deployed {name} ({deployment_id})")
    print(f"flow runs silent for {result.crash_after_s:.0f} s are marked CRASHED (automation {CRASH_AUTOMATION})")
    for name, why in result.missing.items():
        print(f"not deployed {name}: {why}")
    return 1 if result.missing else 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.deployments import parse_params, run

    _quiet_http()
    report = run(args.flow, parse_params(args.param), wait=not args.no_wait, timeout=args.timeout)
    message = f": {report.message}" if report.message else ""
    print(f"{report.deployment}: flow run {report.flow_run_name} ({report.flow_run_id}) {report.state}{message} "
          f"after {report.seconds:.1f} s")
    if args.no_wait:
        return 0
    return 0 if report.state == "COMPLETED" else 1


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    from pipelines.deployments import PREFECT_FILE

    p = sub.add_parser("deploy", help="create or update the deployments of prefect.yaml (schedules, the new-data "
                                      "trigger, concurrency limits) on the Prefect server at PREFECT_API_URL")
    p.add_argument("--prefect-file", default=str(PREFECT_FILE), help="default: the repository's prefect.yaml")
    p.add_argument("--only", action="append", metavar="NAME", help="deploy only this deployment (repeatable)")
    p.add_argument("--pool", help="work pool for every deployment (default: each one's in the file)")
    p.add_argument("--crash-after", type=float, metavar="SECONDS",
                   help="mark a flow run CRASHED after this long without a heartbeat (default: 3 heartbeats of "
                        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY, which the workers must share)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("run", help="start a run of a deployment through the Prefect API, wait for it, print its "
                                   "final state (exit 0 only when COMPLETED)")
    p.add_argument("flow", metavar="FLOW", help="deployment name (e.g. retrain) or FLOW-NAME/DEPLOYMENT-NAME")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a flow parameter; the value is read as YAML (3, true, [a, b], text) (repeatable)")
    p.add_argument("--timeout", type=float, help="stop waiting after this many seconds (the run goes on)")
    p.add_argument("--no-wait", action="store_true", help="print the flow run's id and return")
    p.set_defaults(func=cmd_run)
