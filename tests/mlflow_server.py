"""A real MLflow tracking server for tests: `mlflow server` on 127.0.0.1 at a free port, its SQLite store
and artifacts in a folder of its own, so processes on several (test) nodes log to one store over HTTP
instead of each opening the driver's SQLite file.

With `s3=` the artifacts go to S3 (the SeaweedFS test server) through the server's artifact proxy, as in
infra/: the S3 endpoint and credentials are in the server's environment only, so its clients log and
load models knowing nothing but the tracking URI."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.s3_server import S3Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_HOST_ONLY_THE_SERVER_RESOLVES = "s3.ldmflow-test.invalid"
"""The S3 endpoint's host name as the server knows it. `.invalid` never resolves (RFC 2606), so a client
that tried S3 directly (a presigned URL the server handed out) fails; the server reaches S3 through an
HTTP proxy in its environment only (`_S3Relay`), which forwards every connection to SeaweedFS."""


class _S3Relay:
    """A TCP relay on 127.0.0.1 to the S3 server, used by the MLflow server as its HTTP proxy. botocore sends
    plain-HTTP requests to a proxy in absolute form (`PUT http://s3.ldmflow-test.invalid:PORT/bucket/key`),
    which SeaweedFS (Go's net/http) serves as is, with the Host header the request was signed for."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="s3-relay").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


_SCHEMA_TEMPLATE: Path | None = None


def schema_template() -> Path:
    """An empty SQLite store with MLflow's full schema, made once per test process. A fresh server's own
    start creates the tables and runs every Alembic migration (seconds of CPU on 2 shared cores, for
    each of the suite's ~25 server starts); a copy of this file is the same empty store, which the
    server then only checks (`_verify_schema`) before creating its default experiment, as on any start."""
    global _SCHEMA_TEMPLATE
    if _SCHEMA_TEMPLATE is None or not _SCHEMA_TEMPLATE.exists():
        from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine_with_retry

        # Under the session's runs directory (tests/conftest.py), which goes when the session ends.
        runs = os.environ.get("LDMFLOW_RUNS_DIR")
        if runs:
            Path(runs).mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="mlflow-schema-", dir=runs)) / "mlflow.db"
        engine = create_sqlalchemy_engine_with_retry(f"sqlite:///{path}")
        try:
            _initialize_tables(engine)  # what SqlAlchemyStore does to a database without tables
        finally:
            engine.dispose()
        _SCHEMA_TEMPLATE = path
    return _SCHEMA_TEMPLATE


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # no /proc (not Linux): stop() then waits for the wrapper as before
        return []


def _alive(pid: int) -> bool:
    """Running, not a zombie its parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class MlflowServer:
    """`start()` it, use `uri`, `stop()` it."""

    def __init__(self, folder: Path, *, startup_timeout: float = 120.0, s3: S3Server | None = None,
                 s3_prefix: str = "", extra_args: tuple[str, ...] = ()):
        self.folder = Path(folder)
        self.startup_timeout = startup_timeout
        self.uri = ""
        self.proc: subprocess.Popen | None = None
        self.s3 = s3
        """Artifacts on this S3 server (in a bucket of their own) instead of the local folder."""
        self.s3_prefix = s3_prefix
        self.artifacts_destination = str(self.folder / "artifacts")
        """What `--artifacts-destination` names: the local folder, or s3://BUCKET/PREFIX once started with S3."""
        self._relay: _S3Relay | None = None
        self.extra_args = tuple(extra_args)
        """More `mlflow server` options (e.g. --allowed-hosts)."""

    def server_env(self) -> dict[str, str]:
        """The server's environment: the caller's without any AWS_* or MLflow S3 setting, plus (with S3)
        the endpoint, credentials and path-style addressing that only the server gets."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and not k.startswith("MLFLOW_S3_") and k != "MLFLOW_TRACKING_URI"}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no outbound calls from a test server
        # No job runner (a huey consumer process MLflow 3 starts beside the web server for GenAI jobs and
        # trace roll-ups, which no test uses): it competes for the 2 cores while the server starts, and
        # it is what made SIGTERM take up to 30 s.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        if self.s3 is not None:
            env.update(
                AWS_ACCESS_KEY_ID=self.s3.access_key, AWS_SECRET_ACCESS_KEY=self.s3.secret_key,
                AWS_DEFAULT_REGION=self.s3.region,
                # MLflow builds its boto3 client with endpoint_url=MLFLOW_S3_ENDPOINT_URL (not AWS_ENDPOINT_URL)
                # and Config(s3={"addressing_style": MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE}), default "auto".
                MLFLOW_S3_ENDPOINT_URL=self.s3_endpoint_for_server(),
                # Path style (http://host:port/bucket/key): virtual-host style would put the bucket in the
                # host name (bucket.host), which an S3-compatible server on a plain host name cannot serve.
                MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE="path",
                # boto3 >= 1.36 adds CRC checksums by default; MLflow's Config leaves them to the environment.
                AWS_REQUEST_CHECKSUM_CALCULATION="when_required", AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
                AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true",
            )
            relay = f"http://127.0.0.1:{self._relay.port}"
            env.update(HTTP_PROXY=relay, http_proxy=relay, NO_PROXY="", no_proxy="")
        return env

    def s3_endpoint_for_server(self) -> str:
        assert self.s3 is not None
        port = self.s3.endpoint.rsplit(":", 1)[1]
        return f"http://{S3_HOST_ONLY_THE_SERVER_RESOLVES}:{port}"

    def start(self, port: int | None = None) -> MlflowServer:
        """Start the server, at `port` if given (restart), else at a free port."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "mlflow.db").exists():
            shutil.copyfile(schema_template(), self.folder / "mlflow.db")
        port = port or free_port()
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        if self.s3 is not None and not self.artifacts_destination.startswith("s3://"):
            bucket = self.s3.make_bucket()
            self.artifacts_destination = f"s3://{bucket}/{self.s3_prefix}".rstrip("/")
        if self.s3 is not None and self._relay is None:
            self._relay = _S3Relay(int(self.s3.endpoint.rsplit(":", 1)[1]))
        self.log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", self.artifacts_destination, "--serve-artifacts", *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=self.server_env())
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)  # a refused connection on loopback costs nothing; start-up is what we wait for
        self.stop()
        raise TimeoutError(f"mlflow server at {self.uri} not up after {self.startup_timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            web = _children(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGTERM)
            # The web server (uvicorn, the `mlflow server` process's child) shuts down gracefully at once
            # (the job runner, which took up to 30 s, is off: server_env). The `mlflow server` wrapper
            # around it then spends seconds tearing its interpreter down (3 s and more on the shared
            # cores, paid by each of the suite's server stops): once the web server is gone it has
            # nothing left to do, and the SQLite store is committed per request, so a kill loses nothing.
            deadline = time.monotonic() + 3
            while (self.proc.poll() is None and (not web or any(_alive(pid) for pid in web))
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    def kill(self) -> None:
        """An outage that starts at once (a crashed server or a dropped network): SIGKILL, where stop's
        SIGTERM can take up to 30 s while the server's job runner winds down."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stop()

    def restart(self) -> MlflowServer:
        """Start a stopped server again on the same port and store: its clients see an outage end."""
        self.stop()
        return self.start(port=self.port)
