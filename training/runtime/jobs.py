"""Training as a Ray Job: the submitter's side. The driver runs on the cluster (Ray's job supervisor
starts training.runtime.job_entry there), so the process that submitted it (a Prefect flow worker, a
laptop) may die without taking training with it; a new submitter with the same identity finds the
job again and follows it instead of starting over.

- Identity: the submission id derives from the caller's key (a Prefect flow-run id, or a name given
  by hand): `ldmflow-train-<key>`, then `-attempt2`, `-attempt3`... for retries. Prefect's
  on_cancellation hook runs after the flow-run process is gone, so it can find the job by the flow
  run alone (stop_training_job(key)).
- One call, at most one new job: the newest attempt PENDING or RUNNING is followed; SUCCEEDED
  returns its outcome; FAILED or STOPPED submits the next attempt, which resumes the same MLflow run
  from its latest verified checkpoint (a retry continues, it does not start over). Retrying is the
  orchestrator's decision (Prefect task retries, or running the command again).
- Logs stream to a logger as the job writes them; the outcome (run id, final checkpoint, metrics) is
  the JSON the job publishes in the run storage.
- Stop: Ray's `stop_job` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default,
  read from the job supervisor's environment in ray/dashboard/modules/job/job_supervisor.py, which is
  the job's runtime environment): set to `stop_grace_s` for our jobs, so the driver ends the MLflow
  run and releases its lease before it is killed. A `timeout_s` stops the job itself: Prefect's task
  timeout cannot interrupt a call blocked in a thread.
- Credentials never go into the entrypoint, the metadata or the runtime environment: the job's node
  brings its own (training.runtime.cluster), and the tracking URI goes without its `user:token@`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_prep import storage
from training.config import RunConfig
from training.errors import ConfigError
from training.locations import RUNS_DIR_ENV, embedded_uri, runs_dir, split_credentials, tracking_uri
from training.mlops.tracking import FLOW_RUN_ENV, prefect_flow_run_id
from training.runtime.job_entry import SPEC_ENV, JobSpec, outcome_file, run_file
from training.runtime.launcher import SAMPLE_LOG_ENV
from training.runtime.lease import TTL_ENV

log = logging.getLogger(__name__)

PREFIX = "ldmflow-train-"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
PYTHON_ENV = "LDMFLOW_JOB_PYTHON"
"""The Python that runs the job's entrypoint on the cluster (default `python`: the image's; on a Ray
this process started, this Python)."""
_own_dashboard: str | None = None
"""The Jobs API of the Ray this process started (jobs_address), whose nodes run this Python."""
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LAST_LINES = 20
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
"""Ray colours its log prefixes for a terminal; a flow run's log and an error message get plain text."""


class JobFailed(RuntimeError):
    """The training job ended FAILED or STOPPED, or ran past its timeout."""


class JobsUnreachable(ConfigError):
    """The Ray Jobs API did not answer."""


@dataclass(frozen=True)
class Attempt:
    submission_id: str
    number: int
    status: str
    message: str


# ----------------------------------------------------------------------------- identity and client


def job_key(text: str) -> str:
    """A caller identity fit for a submission id: letters, digits, `-` and `_`, at most 80."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:80]
    if not key:
        raise ConfigError(f"job key {text!r} has no letter or digit; pass a flow-run id or a name")
    return key


def submission_id(key: str, attempt: int = 1) -> str:
    return f"{PREFIX}{job_key(key)}" + (f"-attempt{attempt}" if attempt > 1 else "")


def auth_headers() -> dict[str, str]:
    """Ray's token header when a token is configured here (RAY_AUTH_TOKEN, or the file at
    RAY_AUTH_TOKEN_PATH). Ray's client adds it by itself only when this process runs in token mode
    (RAY_AUTH_MODE=token: ray/_private/authentication/http_token_authentication.py), which a
    submitter outside the cluster usually does not."""
    token = os.environ.get(AUTH_TOKEN_ENV, "").strip()
    path = os.environ.get(AUTH_TOKEN_PATH_ENV)
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"{AUTH_TOKEN_PATH_ENV}={path}: cannot read the Ray auth token ({e.strerror})") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def jobs_address(cfg: RunConfig | None = None) -> str:
    """The Jobs API as `ray job submit` finds it: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (the
    dashboard's http://host:8265), else the dashboard of a Ray started in this process (which then
    lives only as long as this process: on one machine a re-attach needs a Ray started on its own,
    `ray start --head`). A cluster's workers often have RAY_ADDRESS set to the GCS (host:6379, for
    ray.init) and RAY_API_SERVER_ADDRESS to the dashboard, as infra/local/stack exports them."""
    address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if address:
        return address
    import ray
    from ray._private.worker import get_dashboard_url

    if not ray.is_initialized():
        # The job's driver runs here too, beside its workers: one CPU more than the workers ask for.
        wanted = (cfg.train.num_workers * cfg.train.cpus_per_worker + 2) if cfg else 2
        ray.init(num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=True, dashboard_host="127.0.0.1")
    url = get_dashboard_url()
    if not url:
        raise JobsUnreachable("this process's Ray runs without a dashboard, so it has no Jobs API; set RAY_ADDRESS "
                              "to a cluster's http://host:8265, or start it with ray[default] installed")
    global _own_dashboard
    _own_dashboard = url if "://" in url else f"http://{url}"
    return _own_dashboard


def jobs_client(address: str | None = None, cfg: RunConfig | None = None):
    """A JobSubmissionClient for `address` (default: jobs_address()); JobsUnreachable when nothing answers."""
    from ray.job_submission import JobSubmissionClient

    address = address or jobs_address(cfg)
    try:
        return JobSubmissionClient(address, headers=auth_headers() or None)
    except (ConnectionError, RuntimeError) as e:
        raise JobsUnreachable(f"the Ray Jobs API at {address} did not answer ({str(e).splitlines()[0][:200]}); "
                              "check RAY_ADDRESS (the dashboard's http://host:8265) and that the cluster runs "
                              "ray[default]") from None


def _call(what: str, address: str, fn, *args, **kwargs):
    """A Jobs API call, with a connection failure turned into one JobsUnreachable line."""
    import requests

    try:
        return fn(*args, **kwargs)
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise JobsUnreachable(f"the Ray Jobs API at {address} did not answer while {what} "
                              f"({str(e).splitlines()[0][:200]}); the job itself may still be running: "
                              "run the same command again to re-attach") from None


NO_AGENT = "No available agent to submit job"
"""What Ray's Jobs server answers (HTTP 500, "please try again later") while no node's job agent is ready
to take a job: for a while after the head starts, longer on a loaded machine."""
AGENT_WAIT_S = 60.0


def submit(client, logger: logging.Logger, *, wait_s: float = AGENT_WAIT_S, **job) -> None:
    """`client.submit_job(**job)`, tried again with back-off for `wait_s` while the cluster has no job
    agent ready. The submission id is fixed, so a try whose answer was lost but whose job was created is
    found by the next try ("already exists") and taken as submitted."""
    address = client.get_address()
    deadline = time.monotonic() + wait_s
    pause = 1.0
    tried = 0
    while True:
        tried += 1
        try:
            _call("submitting the job", address, client.submit_job, **job)
            return
        except RuntimeError as e:
            if tried > 1 and "already exists" in str(e):
                return
            if NO_AGENT not in str(e):
                raise
            if time.monotonic() + pause > deadline:
                raise JobsUnreachable(f"the Ray cluster at {address} had no job agent ready to take the job for "
                                      f"{wait_s:.0f} s (Ray: {NO_AGENT}); check its nodes' dashboard agents "
                                      "(`ray status`, the agent logs) and run the same command again") from None
            logger.info("the Ray cluster at %s has no job agent ready yet; submitting again in %.0f s",
                        address, pause)
            time.sleep(pause)
            pause = min(pause * 2, 8.0)


def attempts(client, key: str) -> list[Attempt]:
    """This key's jobs on the cluster, oldest attempt first."""
    base = submission_id(key)
    found = []
    for job in _call("listing jobs", client.get_address(), client.list_jobs):
        sid = job.submission_id or ""
        if sid == base:
            number = 1
        elif sid.startswith(base + "-attempt") and sid[len(base) + 8:].isdigit():
            number = int(sid[len(base) + 8:])
        else:
            continue
        found.append(Attempt(sid, number, str(getattr(job.status, "value", job.status)), job.message or ""))
    return sorted(found, key=lambda a: a.number)


def key_dir(storage_uri: str, key: str) -> str:
    return storage.join(storage_uri, "jobs", job_key(key))


# ----------------------------------------------------------------------------- submit, follow, stop


def run_training_job(cfg: RunConfig, data: str, *, key: str, storage_uri: str | None = None,
                     timeout_s: float | None = None, log: logging.Logger | None = None,
                     stop_grace_s: float = 120.0, address: str | None = None,
                     allow_new_data: bool = False, on_submit: Callable[[str], None] | None = None):
    """Train `cfg` on `data` as a Ray Job named by `key`, follow it to its end and return its
    training.mlops.publish.TrainOutcome. Re-attaches to the key's running job, returns a finished
    one's outcome, and resumes a failed or stopped one's MLflow run as the next attempt (see the
    module docstring). `timeout_s` (from now) stops the job, with `stop_grace_s` for it to end
    cleanly, and raises JobFailed; a failed job raises JobFailed with its status message and last
    log lines; an unreachable Jobs API raises JobsUnreachable. `on_submit(submission_id)` is called
    with the job followed (a flow records it)."""
    from training.runtime.driver import default_storage

    logger = log or logging.getLogger("ldmflow.job")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    storage_uri = storage.collapse_slashes(storage.absolute(storage_uri or default_storage()))
    data = storage.absolute(data)
    client = jobs_client(address, cfg)
    address = client.get_address()
    folder = key_dir(storage_uri, key)
    tried = attempts(client, key)
    latest = tried[-1] if tried else None
    if latest is not None and latest.status in ACTIVE:
        logger.info("re-attaching to Ray job %s (%s) at %s", latest.submission_id, latest.status, address)
        sid = latest.submission_id
    elif latest is not None and latest.status == "SUCCEEDED":
        logger.info("Ray job %s already succeeded; taking its outcome", latest.submission_id)
        return read_outcome(folder, latest.submission_id)
    else:
        number = latest.number + 1 if latest else 1
        resume_id = _resumable_run(folder, storage_uri, latest) if latest else None
        sid = submission_id(key, number)
        spec = JobSpec(submission_id=sid, key_dir=folder, data=data, storage=storage_uri, config=cfg.to_dict(),
                       resume_run_id=resume_id, allow_new_data=allow_new_data)
        submit(client, logger, entrypoint=entrypoint(address), submission_id=sid,
               runtime_env={"env_vars": job_env(spec, stop_grace_s)},
               metadata={"ldmflow.key": job_key(key), "ldmflow.attempt": str(number),
                         "ldmflow.resumes": resume_id or ""})
        what = f"resuming MLflow run {resume_id} after {latest.submission_id} {latest.status}" if resume_id \
            else "a new run"
        logger.info("submitted Ray job %s to %s: %s", sid, address, what)
    if on_submit is not None:
        on_submit(sid)
    status, lines = follow(client, sid, logger, deadline=deadline, stop_grace_s=stop_grace_s)
    if status != "SUCCEEDED":
        info = _call("reading the job's status", address, client.get_job_info, sid)
        tail = "\n".join(lines) or "(no log lines)"
        if status == "TIMEOUT":
            raise JobFailed(f"Ray job {sid} ran past its timeout of {timeout_s:.0f} s and was stopped "
                            f"({info.status}); run again with the same key to resume it. Last log lines:\n{tail}")
        raise JobFailed(f"Ray job {sid} {status}: {(info.message or '').strip() or 'no message'}; run again with "
                        f"the same key to resume it from its last checkpoint. Last log lines:\n{tail}")
    return read_outcome(folder, sid)


def entrypoint(address: str | None = None) -> str:
    """The job's command. On a Ray this process started, its nodes are this machine and this Python is
    the one with the project (a bare `python` may be another: a venv run without activating it)."""
    own = address is not None and _own_dashboard is not None and address.rstrip("/") == _own_dashboard.rstrip("/")
    python = os.environ.get(PYTHON_ENV) or (sys.executable if own else "python")
    return f"{shlex.quote(python)} -m training.runtime.job_entry"


def job_env(spec: JobSpec, stop_grace_s: float) -> dict[str, str]:
    """The job's environment variables: the spec, the stop grace, where MLflow is (without
    credentials) and the S3 endpoint settings; never a credential."""
    uri, _ = split_credentials(tracking_uri())
    env = {SPEC_ENV: spec.to_json(), "RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s)), "MLFLOW_TRACKING_URI": uri,
           **storage.env_for_workers()}
    if uri == embedded_uri():  # one machine: the job's runs folder (the store's artifacts) is this one
        env[RUNS_DIR_ENV] = str(runs_dir())
    for name in (TTL_ENV, SAMPLE_LOG_ENV):
        if os.environ.get(name):
            env[name] = os.environ[name]
    flow_run = prefect_flow_run_id()
    if flow_run:  # the run's lineage tag (training.runtime.driver.run_tags), read on the job's node
        env[FLOW_RUN_ENV] = flow_run
    return env


def _resumable_run(folder: str, storage_uri: str, failed: Attempt) -> str | None:
    """The MLflow run a failed attempt trained, when it has a verified checkpoint to resume from
    (else None: the retry starts a new run, as nothing was saved). A lease the failed job left
    (SIGKILLed, it could not release it) is broken: Ray says its holder is gone."""
    from training.checkpoint.run_storage import run_uri
    from training.checkpoint.verify import latest_verified_checkpoint
    from training.locations import setup_mlflow
    from training.runtime import lease
    from training.runtime.driver import ray_run_name

    uri = run_file(folder)
    try:
        run_id = json.loads(storage.storage_for(uri).read_bytes(uri))["run_id"]
    except FileNotFoundError:
        return None
    if latest_verified_checkpoint(run_uri(storage_uri, ray_run_name(run_id))) is None:
        log.info("run %s of %s has no verified checkpoint; the retry starts a new run", run_id, failed.submission_id)
        return None
    import mlflow

    setup_mlflow()
    client = mlflow.MlflowClient()
    held = lease.current_holder(client, run_id)
    if held is not None and f" ray-job {failed.submission_id}:" in held[0]:
        log.info("breaking the lease of run %s left by %s (%s)", run_id, failed.submission_id, failed.status)
        lease.release(client, run_id, held[0])
    return run_id


def read_outcome(folder: str, sid: str):
    from training.mlops.publish import TrainOutcome

    uri = outcome_file(folder, sid)
    try:
        return TrainOutcome(**json.loads(storage.storage_for(uri).read_bytes(uri)))
    except FileNotFoundError:
        raise JobFailed(f"Ray job {sid} succeeded but published no outcome at {uri}; was it submitted by "
                        "this version of ldmflow?") from None


def follow(client, sid: str, logger: logging.Logger, *, deadline: float | None,
           stop_grace_s: float) -> tuple[str, list[str]]:
    """Stream job `sid`'s log lines to `logger` until it ends; (final status or "TIMEOUT", last lines).
    Past `deadline` the job is stopped (and waited for, up to stop_grace_s + 30 s)."""
    import aiohttp

    lines: deque[str] = deque(maxlen=LAST_LINES)

    async def tail() -> None:
        partial = ""
        async for chunk in client.tail_job_logs(sid):
            partial += chunk
            *complete, partial = partial.split("\n")
            for line in complete:
                line = _ANSI.sub("", line)
                lines.append(line)
                logger.info("[%s] %s", sid, line)
        if partial:
            partial = _ANSI.sub("", partial)
            lines.append(partial)
            logger.info("[%s] %s", sid, partial)

    remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    try:
        _run_coroutine(asyncio.wait_for(tail(), timeout=remaining))
    except (asyncio.TimeoutError, TimeoutError):
        logger.warning("Ray job %s ran past its timeout; stopping it (grace %.0f s)", sid, stop_grace_s)
        _stop_and_wait(client, sid, stop_grace_s)
        return "TIMEOUT", list(lines)
    except (RuntimeError, OSError, aiohttp.ClientError) as e:
        # The log stream broke (a dashboard restart): the job may go on; poll instead.
        logger.warning("the log stream of Ray job %s broke (%s); polling its status", sid, str(e)[:200])
    # The stream ends when the job does, its status may be written a moment later.
    while True:
        status = str(_call("polling the job", client.get_address(), client.get_job_status, sid).value)
        if status in TERMINAL:
            return status, list(lines)
        if deadline is not None and time.monotonic() > deadline:
            _stop_and_wait(client, sid, stop_grace_s)
            return "TIMEOUT", list(lines)
        time.sleep(1.0)


def _run_coroutine(coro):
    """asyncio.run(coro), from a thread of its own when this one already runs an event loop (an async
    Prefect flow calling a sync task in its loop's thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="job-logs") as pool:
        return pool.submit(asyncio.run, coro).result()


def _stop_and_wait(client, sid: str, grace_s: float) -> str:
    _call("stopping the job", client.get_address(), client.stop_job, sid)
    end = time.monotonic() + grace_s + 30
    status = "RUNNING"
    while time.monotonic() < end:
        status = str(client.get_job_status(sid).value)
        if status in TERMINAL:
            break
        time.sleep(1.0)
    return status


def stop_training_job(key: str, *, address: str | None = None, wait_s: float = 150.0) -> str | None:
    """Stop the key's active job (the on_cancellation hook's call: it needs only the key) and wait up
    to `wait_s` for it to end; its submission id, or None when none was active. The grace between
    SIGTERM and SIGKILL is the one the job was submitted with (run_training_job's stop_grace_s)."""
    client = jobs_client(address)
    active = [a for a in attempts(client, key) if a.status in ACTIVE]
    for attempt in active:
        log.info("stopping Ray job %s", attempt.submission_id)
        _stop_and_wait(client, attempt.submission_id, max(wait_s - 30, 0))
    return active[-1].submission_id if active else None
