"""Prefect's scheduler inserts a cron schedule's runs with the SQLAlchemy in constraints.txt.

With SQLAlchemy 2.1.9 Prefect 3.8.8's `schedule_runs` fails on every insert ("Can't evaluate bulk DML
statement; please supply a bulk_dml decorated function"): a Prefect server then creates no scheduled run,
so retrain's cron schedule never fires (seen in the local stack's prefect.log). This runs the scheduler's
own insert against a SQLite database of its own, in a subprocess (Prefect reads its settings on import);
no server. tests/infra/test_local_stack.py checks the same through a real server."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import asyncio, os, sys
os.environ["PREFECT_HOME"] = sys.argv[1]
os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{sys.argv[1]}/prefect.db"
from prefect.server import models, schemas
from prefect.server.database import provide_database_interface
from prefect.server.schemas.schedules import CronSchedule

async def main():
    db = provide_database_interface()
    await db.create_db()
    async with db.session_context(begin_transaction=True) as session:
        flow = await models.flows.create_flow(session, schemas.core.Flow(name="f"))
        dep = await models.deployments.create_deployment(session, schemas.core.Deployment(name="d", flow_id=flow.id))
        schedule = schemas.actions.DeploymentScheduleCreate(schedule=CronSchedule(cron="0 3 * * *", timezone="UTC"))
        await models.deployments.create_deployment_schedules(session, dep.id, [schedule])
        print(len(await models.deployments.schedule_runs(session, deployment_id=dep.id)))

asyncio.run(main())
"""


def test_the_scheduler_inserts_cron_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) >= 1, proc.stdout
