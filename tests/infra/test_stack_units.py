"""infra/local/stack's pieces that need no service: ports, configuration, process records, the exports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from infra.local.stack import GRPC_OFFSET, PAIRED, SINGLE, Stack, StackConfig, alive, assign_ports, main, port_free


def test_ports_are_distinct_free_and_kept_across_runs():
    ports = assign_ports({"prefect": 0}, {})
    assert set(ports) == set(PAIRED) | set(SINGLE)
    every = list(ports.values()) + [ports[name] + GRPC_OFFSET for name in PAIRED]
    assert len(every) == len(set(every)), "ports must not collide (SeaweedFS's gRPC ports included)"
    assert all(port_free(p) for p in every)
    again = assign_ports({}, ports)
    assert again == ports, "free ports of the last run are reused, so URLs and exports stay valid"


def test_a_taken_port_is_not_reused_but_a_requested_one_is_kept():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        ports = assign_ports({}, {"mlflow": taken})
        assert ports["mlflow"] != taken
        assert assign_ports({"mlflow": taken}, {})["mlflow"] == taken  # given: used as is (the server says if busy)
    with pytest.raises(ValueError, match="unknown stack port name"):
        assign_ports({"nope": 1}, {})


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="stack port `prefect` must be 0-65535"):
        StackConfig(folder=tmp_path, ports={"prefect": 70000})
    with pytest.raises(ValueError, match="ray_cpus_per_node"):
        StackConfig(folder=tmp_path, ray_cpus_per_node=0)


def test_a_record_is_alive_only_for_the_process_it_names():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import psutil

        record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time()}
        assert alive(record)
        assert not alive({**record, "create_time": record["create_time"] - 100})  # a reused pid
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    assert not alive(record)
    assert not alive(None)


def test_status_and_env_of_a_stack_never_started(tmp_path, capsys):
    assert Stack(StackConfig(folder=tmp_path)).status() == {name: "down" for name in
                                                            ("seaweedfs", "mlflow", "prefect", "worker", "ray-head",
                                                             "ray-node")}
    assert main(["env", "--dir", str(tmp_path)]) == 2
    assert "run `infra/local/stack up` first" in capsys.readouterr().err
    assert main(["down", "--dir", str(tmp_path)]) == 0


def test_exports_point_clients_at_the_stack_and_keep_secrets_private(tmp_path):
    stack = Stack(StackConfig(folder=tmp_path))
    stack.state["ports"] = assign_ports({}, {})
    stack._secrets()
    stack._save()
    env = stack.client_env()
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{stack.ports['prefect']}/api"
    assert env["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{stack.ports['dashboard']}"
    assert env["LDMFLOW_STORAGE"].startswith("s3://ldm-data/")
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 32 and len(env["RAY_AUTH_TOKEN"]) >= 64
    assert os.stat(stack.state_path).st_mode & 0o077 == 0, "stack.json holds the S3 secret and Ray token"
    # Each service's command is built from the same ports (no service starts here).
    services = stack.services()
    assert f"-s3.port={stack.ports['s3']}" in services["seaweedfs"].command()
    assert f"--address=127.0.0.1:{stack.ports['ray']}" in services["ray-node"].command()
    assert "AWS_SECRET_ACCESS_KEY" not in services["prefect"].env(), "only S3's users get the S3 keys"
    assert services["mlflow"].env()["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]
