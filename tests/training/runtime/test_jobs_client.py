"""The submitter's side of training.runtime.jobs that needs no cluster: the job's identity, what goes
into its definition (never a credential), Ray's auth header, and one line when the Jobs API is not
there."""

from __future__ import annotations

import json

import pytest

from tests.mlflow_server import free_port


def test_submission_id_is_the_callers_identity():
    from training.runtime.jobs import submission_id

    flow_run = "0c6e1f3a-7d2b-4f7e-9a51-2b8f0d3c9e10"
    assert submission_id(flow_run) == submission_id(flow_run)  # the same flow run names the same job
    assert submission_id(flow_run) == f"ldmflow-train-{flow_run}"
    assert submission_id(flow_run, 3) == f"ldmflow-train-{flow_run}-attempt3"
    assert submission_id("nightly retrain / shapes") == "ldmflow-train-nightly-retrain-shapes"


def test_empty_key_refused():
    from training.errors import ConfigError
    from training.runtime.jobs import submission_id

    with pytest.raises(ConfigError, match="job key"):
        submission_id("///")


def test_job_definition_carries_no_credentials(monkeypatch, tmp_path):
    """A planted MLflow user:token@ and AWS secret appear nowhere in the job's environment or entrypoint;
    the tracking URI goes without its userinfo, the S3 endpoint goes as it is."""
    from training.config import load_config
    from training.runtime.job_entry import SPEC_ENV, JobSpec
    from training.runtime.jobs import entrypoint, job_env

    secret = "planted-secret-7f3a"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{secret}@127.0.0.1:5999")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    cfg = load_config("configs/tiny.yaml")
    spec = JobSpec(submission_id="ldmflow-train-k", key_dir=str(tmp_path / "jobs" / "k"), data=str(tmp_path),
                   storage=str(tmp_path), config=cfg.to_dict())
    env = job_env(spec, stop_grace_s=90)
    text = json.dumps(env) + entrypoint()
    assert secret not in text
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "90"  # read by Ray's job supervisor from the job's environment
    assert JobSpec.from_json(env[SPEC_ENV]) == spec


def test_auth_token_header(monkeypatch, tmp_path):
    from training.runtime.jobs import auth_headers

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_headers() == {}
    token_file = tmp_path / "token"
    token_file.write_text("tok-from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert auth_headers() == {"Authorization": "Bearer tok-from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-from-env")
    assert auth_headers() == {"Authorization": "Bearer tok-from-env"}


def test_unreachable_jobs_api_is_one_line():
    from training.runtime.jobs import JobsUnreachable, jobs_client

    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(JobsUnreachable) as e:
        jobs_client(address)
    assert address in str(e.value) and "RAY_ADDRESS" in str(e.value) and "\n" not in str(e.value)


def test_cli_submit_and_stop_refusals(monkeypatch, capsys):
    """`ldmflow train --submit` without an identity, with --resume, and `ldmflow job stop` with no Jobs
    API: exit 2 with one line each, before anything is submitted."""
    from pipelines.cli import main

    monkeypatch.delenv("LDMFLOW_FLOW_RUN_ID", raising=False)
    assert main(["train", "--submit", "--data", "/nonexistent"]) == 2
    assert main(["train", "--submit", "--job-key", "k", "--data", "/nonexistent", "--resume", "r"]) == 2
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    assert main(["job", "stop", "k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--job-key" in err[0] and "--submit resumes by itself" in err[1], err
    assert "did not answer" in err[2] and "RAY_ADDRESS" in err[2], err


def test_jobs_api_address_prefers_the_api_server_variable(monkeypatch):
    # As `ray job submit`: on a cluster node RAY_ADDRESS is often the GCS (for ray.init), and the
    # dashboard is in RAY_API_SERVER_ADDRESS (infra/local/stack exports both).
    from training.runtime.jobs import jobs_address

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
    assert jobs_address() == "http://127.0.0.1:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert jobs_address() == "http://10.0.0.5:8265"


def test_entrypoint_python(monkeypatch):
    """A cluster's job runs its image's `python`; a job on the Ray this process started runs this Python
    (the one with the project, even when its venv is not activated); LDMFLOW_JOB_PYTHON overrides both."""
    import shlex
    import sys

    from training.runtime import jobs

    monkeypatch.delenv(jobs.PYTHON_ENV, raising=False)
    monkeypatch.setattr(jobs, "_own_dashboard", "http://127.0.0.1:8265")
    assert jobs.entrypoint("http://10.0.0.5:8265") == "python -m training.runtime.job_entry"
    assert jobs.entrypoint("http://127.0.0.1:8265/") == f"{shlex.quote(sys.executable)} -m training.runtime.job_entry"
    monkeypatch.setenv(jobs.PYTHON_ENV, "/opt/py/bin/python3")
    assert jobs.entrypoint("http://127.0.0.1:8265") == "/opt/py/bin/python3 -m training.runtime.job_entry"


class _NoAgentYet:
    """A Jobs API (Ray's routes, Ray's answers) whose cluster has no job agent ready for the first
    `busy` submissions, then takes them; `created` answers "already exists" for a known id, as Ray does."""

    def __init__(self, busy: int):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import ray

        self.busy, self.posts, self.created = busy, 0, set()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: str, kind: str = "application/json"):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.startswith("/api/version"):
                    self._answer(200, json.dumps({"version": "4", "ray_version": ray.__version__,
                                                  "ray_commit": "x", "session_name": "s"}))
                else:
                    self._answer(404, "not found", "text/plain")

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.posts += 1
                if api.posts <= api.busy:
                    # job_head.py, when no agent answers in time
                    self._answer(500, "No available agent to submit job, please try again later.", "text/plain")
                elif request["submission_id"] in api.created:
                    self._answer(400, f"Job with submission_id {request['submission_id']} already exists. "
                                      "Please use a different submission_id.", "text/plain")
                else:
                    api.created.add(request["submission_id"])
                    self._answer(200, json.dumps({"job_id": request["submission_id"],
                                                  "submission_id": request["submission_id"]}))

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_cluster_without_a_job_agent_yet_is_asked_again_then_refused_in_one_line(caplog):
    """Right after a head starts (longer on a loaded machine) Ray's Jobs server answers 'No available
    agent to submit job, please try again later': the submission is tried again with back-off, and only
    a cluster that stays without an agent past the wait is refused, in one line."""
    import logging

    from ray.job_submission import JobSubmissionClient

    from training.runtime.jobs import JobsUnreachable, submit

    logger = logging.getLogger("test.jobs")
    api = _NoAgentYet(busy=2)
    try:
        client = JobSubmissionClient(api.address)
        with caplog.at_level(logging.INFO, logger="test.jobs"):
            submit(client, logger, wait_s=30, entrypoint="true", submission_id="ldmflow-train-k")
        assert api.created == {"ldmflow-train-k"} and api.posts == 3
        assert sum("no job agent ready yet" in r.getMessage() for r in caplog.records) == 2

        # A try whose answer was lost after the job was made: the next one finds it, and that is a submit.
        api.busy, api.posts = 1, 0
        api.created.add("ldmflow-train-lost")
        submit(client, logger, wait_s=30, entrypoint="true", submission_id="ldmflow-train-lost")
        # ...but a first try that finds the id taken is someone else's job: refused, as Ray says.
        api.busy, api.posts = 0, 0
        with pytest.raises(RuntimeError, match="already exists"):
            submit(client, logger, wait_s=30, entrypoint="true", submission_id="ldmflow-train-k")

        api.busy, api.posts = 100, 0
        with pytest.raises(JobsUnreachable) as refused:
            submit(client, logger, wait_s=2, entrypoint="true", submission_id="ldmflow-train-never")
        message = str(refused.value)
        assert "\n" not in message and api.address in message and "no job agent ready" in message
        assert "ldmflow-train-never" not in api.created
    finally:
        api.close()
