"""What a multi-node cluster cannot share with the driver (training.runtime.cluster), the credentials
`--forward-credentials` hands over, and the worker pre-flight's own checks (training.runtime.preflight)
on local storage. The same rules against two real Ray nodes: tests/training/runtime/test_two_nodes.py."""

from __future__ import annotations

import pytest

from training.errors import ConfigError
from training.runtime.cluster import FORWARDED_ENV, check_job_forwards, forwarded_credentials, node_local_problems


def problems(storage_uri="/runs/ray", *, given=False, tracking="sqlite:////runs/mlflow/mlflow.db",
             ips=("10.0.0.1", "10.0.0.2"), driver="10.0.0.1"):
    return node_local_problems(storage_uri, storage_given=given, tracking_uri=tracking, node_ips=list(ips),
                               driver_ip=driver)


def test_one_node_keeps_local_storage_and_sqlite():
    assert problems(ips=["10.0.0.1"]) == []
    assert problems(ips=["10.0.0.1"], tracking="http://localhost:5000") == []


def test_several_nodes_refuse_the_default_storage_and_a_file_store():
    found = problems()
    assert len(found) == 2
    assert "default /runs/ray" in found[0] and "--storage s3://" in found[0]
    assert "sqlite:////runs/mlflow/mlflow.db" in found[1] and "MLFLOW_TRACKING_URI=http://" in found[1]
    assert "file:///runs/mlruns" in problems(given=True, tracking="file:///runs/mlruns")[0]
    assert len(problems(given=True, tracking="/runs/mlruns")) == 1  # a bare path is a file store too


def test_given_or_s3_storage_and_a_reachable_server_pass():
    # An explicit local path may be a shared mount: each worker's pre-flight checks it sees the driver's marker.
    assert problems(given=True, tracking="http://mlflow.internal:5000") == []
    assert problems("s3://bucket/ray", tracking="postgresql://u:p@db.internal/mlflow") == []


@pytest.mark.parametrize("uri", ["http://localhost:5000", "http://127.0.0.1:5000", "https://[::1]:443",
                                 "postgresql://u:p@127.0.0.2/mlflow"])
def test_a_loopback_server_is_refused_when_a_node_is_on_another_host(uri):
    assert "only this machine reaches" in problems(given=True, tracking=uri)[0]
    # Nodes on this host (several raylets on one machine) do reach it.
    assert problems(given=True, tracking=uri, ips=["10.0.0.1", "10.0.0.1"]) == []
    # A Ray Client driver (ray://) runs on no node: nothing reaches its loopback.
    assert problems(given=True, tracking=uri, ips=["10.0.0.1"], driver=None)


def test_forwarded_credentials_are_the_ones_set(monkeypatch):
    for key in FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="nothing to forward"):
        forwarded_credentials()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "token")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "")  # empty: not forwarded
    assert forwarded_credentials() == {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret",
                                       "MLFLOW_TRACKING_TOKEN": "token"}


def test_forwarding_into_a_job_started_without_it_is_refused():
    check_job_forwards({"AWS_ACCESS_KEY_ID": "id", "OTHER": "x"}, {"AWS_ACCESS_KEY_ID": "id"})
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        check_job_forwards({"AWS_ACCESS_KEY_ID": "id"}, {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s"})


def test_preflight_storage_check_needs_the_drivers_marker(tmp_path):
    from data_prep.storage import StorageError
    from training.runtime.preflight import check_data_readable, check_storage

    run = tmp_path / "ray" / "train-x"
    marker = run / ".ldmflow-driver-0123"
    # A folder of this node's own: writable, but without the marker the driver wrote in its storage.
    with pytest.raises(StorageError, match="not the driver's"):
        check_storage(str(run), str(marker))
    marker.write_bytes(b"")
    check_storage(str(run), str(marker))
    assert sorted(p.name for p in run.iterdir()) == [marker.name]  # the write probe is gone
    with pytest.raises(StorageError, match="does not exist"):
        check_data_readable(str(tmp_path / "no-shards"))
