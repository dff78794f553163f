"""A real MLflow tracking server for tests: `mlflow server` on 127.0.0.1 at a free port, its SQLite store
and artifacts in a folder of its own, so processes on several (test) nodes log to one store over HTTP
instead of each opening the driver's SQLite file."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`start()` it, use `uri`, `stop()` it."""

    def __init__(self, folder: Path, *, startup_timeout: float = 120.0):
        self.folder = Path(folder)
        self.startup_timeout = startup_timeout
        self.uri = ""
        self.proc: subprocess.Popen | None = None

    def start(self, port: int | None = None) -> MlflowServer:
        """Start the server, at `port` if given (restart), else at a free port."""
        self.folder.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server at {self.uri} not up after {self.startup_timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import os

            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def restart(self) -> MlflowServer:
        """Start a stopped server again on the same port and store: its clients see an outage end."""
        self.stop()
        return self.start(port=self.port)
