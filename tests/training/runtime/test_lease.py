"""The run lease against a real MLflow store (the session's SQLite store; registered-model creation is
what makes it atomic): a second driver is refused while the first holds it, an expired lease is taken
over, the holder's thread renews it, and a lease is released when its block ends."""

from __future__ import annotations

import time
import uuid

import pytest


@pytest.fixture
def client():
    import mlflow

    from training.locations import setup_mlflow

    setup_mlflow()
    return mlflow.MlflowClient()


def test_second_driver_refused_while_the_first_holds_the_lease(client):
    from training.runtime.lease import LeaseHeld, current_holder, run_lease

    run_id = uuid.uuid4().hex
    with run_lease(run_id, holder="driver-a", ttl_s=60):
        with pytest.raises(LeaseHeld) as refused, run_lease(run_id, holder="driver-b", ttl_s=60):
            pytest.fail("a second driver got the lease of a run the first is training")
        message = str(refused.value)
        assert "\n" not in message and "driver-a" in message and run_id in message and "expires" in message
        assert current_holder(client, run_id)[0] == "driver-a"  # the refusal left the holder's lease alone
    assert current_holder(client, run_id) is None  # released at the end of the block


def test_expired_lease_is_taken_over(client):
    from training.runtime.lease import acquire, current_holder, run_lease

    run_id = uuid.uuid4().hex
    acquire(client, run_id, "dead-driver", ttl_s=1)  # a driver that died: nobody renews it
    time.sleep(2.2)
    with run_lease(run_id, holder="new-driver", ttl_s=60):
        assert current_holder(client, run_id)[0] == "new-driver"


def test_holder_renews_its_lease(client):
    from training.runtime.lease import current_holder, run_lease

    run_id = uuid.uuid4().hex
    with run_lease(run_id, holder="driver-a", ttl_s=3):
        first = current_holder(client, run_id)[1]
        time.sleep(4.5)  # past the first expiry: renewed every second
        holder, expires = current_holder(client, run_id)
        assert holder == "driver-a" and expires > first and expires > time.time()


def test_lease_is_not_listed_as_a_model(client):
    from training.mlops.registry import RegistryError, require_model
    from training.runtime.lease import run_lease

    run_id = uuid.uuid4().hex
    with run_lease(run_id, holder="driver-a", ttl_s=60):
        with pytest.raises(RegistryError) as missing:
            require_model(client, "no-such-model")
        assert run_id not in str(missing.value)


def test_lease_of_a_dead_process_on_this_machine_is_taken_over(client):
    """A driver killed here (SIGKILL) leaves a live-looking lease; a resume on the same machine need
    not wait out its expiry. A live process's lease, or another host's, is respected."""
    import subprocess
    import sys

    from training.runtime.lease import LeaseHeld, acquire, current_holder, holder_gone, holder_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = holder_name()
    gone = me.replace(me.split(" ")[0].rpartition(":")[2] + " ", f"{dead.pid} ", 1)
    elsewhere = me.replace("@", "@other-host-", 1)
    assert holder_gone(gone) and not holder_gone(me) and not holder_gone(elsewhere)

    run_id = uuid.uuid4().hex
    acquire(client, run_id, gone, ttl_s=600)
    acquire(client, run_id, "new-driver", ttl_s=600)
    assert current_holder(client, run_id)[0] == "new-driver"

    other = uuid.uuid4().hex
    acquire(client, other, elsewhere, ttl_s=600)
    with pytest.raises(LeaseHeld):
        acquire(client, other, "new-driver", ttl_s=600)
