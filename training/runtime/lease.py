"""The run lease: while a driver trains an MLflow run, it holds that run's lease, so a second driver's
`resume` of the same run is refused instead of training it twice at once (two drivers writing one
run's checkpoints and metrics, each resuming from the other's steps).

The lease is the promotion lock's pattern (training.mlops.registry.promotion_lock): creating a
registered model is atomic on the MLflow server (names are unique in its store), so a registered model
named `<run id>.training-lease` is the lease, and whoever created it holds it. Its tags name the holder
and an expiry, which a thread renews while training runs: a driver that died (SIGKILL, a lost head
node) stops renewing, and its lease is taken over once it expired. MLflow is the one store every
driver of a run already shares (the run itself lives there), whatever its checkpoint storage is.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from training.errors import ConfigError
from training.mlops.registry import LEASE_SUFFIX, user

log = logging.getLogger(__name__)

TTL_ENV = "LDMFLOW_LEASE_TTL_S"
DEFAULT_TTL_S = 120.0
"""How long a lease outlives its holder's last renewal; renewed every third of it. Long enough to ride
out a slow MLflow answer, short enough that a run whose driver died can be resumed soon after."""


class LeaseHeld(ConfigError):
    """Another live driver holds the run's lease."""


def lease_name(run_id: str) -> str:
    return run_id + LEASE_SUFFIX


def default_ttl_s() -> float:
    text = os.environ.get(TTL_ENV)
    if not text:
        return DEFAULT_TTL_S
    try:
        ttl = float(text)
    except ValueError:
        raise ConfigError(f"{TTL_ENV}={text!r} must be a number of seconds") from None
    if ttl < 3:
        raise ConfigError(f"{TTL_ENV}={text!r} must be at least 3 seconds (renewed every third of it)")
    return ttl


def holder_name(note: str | None = None) -> str:
    """Who holds a lease: `user@host:pid note:nonce`, the note saying what it is (a driver, the Ray job
    it runs in)."""
    return f"{user()}@{socket.gethostname()}:{os.getpid()} {note or 'driver'}:{uuid.uuid4().hex[:6]}"


def holder_gone(holder: str) -> bool:
    """Whether `holder` (holder_name's user@host:pid ...) is a process of this machine that no longer
    runs: a driver killed here (SIGKILL, a crash) leaves a lease nobody renews, and a resume on the
    same machine need not wait out its expiry. A holder on another host is judged by its expiry alone."""
    import psutil

    host, _, pid = holder.split(" ", 1)[0].partition("@")[2].rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not psutil.pid_exists(int(pid))


def _when(expires: float) -> str:
    return datetime.fromtimestamp(expires, timezone.utc).isoformat(timespec="seconds")


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def current_holder(client, run_id: str) -> tuple[str, float] | None:
    """(holder, expiry as a Unix time) of the run's lease, or None when nobody holds it."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lease_name(run_id)).tags
    except MlflowException as e:
        if _not_found(e):
            return None
        raise
    return tags.get("holder", "?"), float(tags.get("expires", 0))


def acquire(client, run_id: str, holder: str, *, ttl_s: float) -> None:
    """Take the run's lease for `holder`, taking over an expired one; LeaseHeld (one line naming the
    holder and when its lease expires) when a live driver holds it."""
    from mlflow.exceptions import MlflowException

    name = lease_name(run_id)
    for _ in range(5):  # a lease released or broken between our create and our read: try again
        try:
            client.create_registered_model(name, tags={"holder": holder, "expires": f"{time.time() + ttl_s:.0f}"},
                                           description=f"held by {holder} while it trains MLflow run {run_id}; "
                                                       "deleted when it stops")
            return
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        held = current_holder(client, run_id)
        if held is None:
            continue
        other, expires = held
        if expires >= time.time() and not holder_gone(other):
            raise LeaseHeld(f"run {run_id} is being trained by {other} (its lease expires {_when(expires)} unless "
                            f"renewed); wait for that driver to finish or stop it, or resume after the lease expired")
        # Two drivers breaking one expired lease at once could both go on: the window the promotion
        # lock leaves too; a lease expires only after its holder stopped renewing for ttl_s.
        log.warning("taking over the lease of run %s held by %s (%s)", run_id, other,
                    f"expired {_when(expires)}" if expires < time.time() else "its process on this machine is gone")
        release(client, run_id, other)
    raise LeaseHeld(f"run {run_id}: its lease kept changing hands while this driver tried to take it; try again")


def release(client, run_id: str, holder: str) -> bool:
    """Delete the run's lease if `holder` holds it; True when it did."""
    from mlflow.exceptions import MlflowException

    held = current_holder(client, run_id)
    if held is None or held[0] != holder:
        return False
    try:
        client.delete_registered_model(lease_name(run_id))
    except MlflowException as e:
        if not _not_found(e):
            raise
    return True


def renew(client, run_id: str, holder: str, *, ttl_s: float) -> bool:
    """Push the expiry of `holder`'s lease ttl_s ahead; False when it no longer holds it."""
    held = current_holder(client, run_id)
    if held is None or held[0] != holder:
        return False
    client.set_registered_model_tag(lease_name(run_id), "expires", f"{time.time() + ttl_s:.0f}")
    return True


@contextmanager
def run_lease(run_id: str, *, holder: str | None = None, ttl_s: float | None = None) -> Iterator[str]:
    """Hold the lease of MLflow run `run_id` for the duration of the block, renewed every ttl_s / 3 by
    a daemon thread; released at the end (an error included). Raises LeaseHeld at entry when a live
    driver holds it. A renewal that fails (the server down) is retried at the next tick: the lease
    has ttl_s of slack, and training itself rides out an outage."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    ttl_s = default_ttl_s() if ttl_s is None else ttl_s
    holder = holder or holder_name()
    acquire(client, run_id, holder, ttl_s=ttl_s)
    log.info("run %s: lease held by %s (renewed every %.0f s)", run_id, holder, ttl_s / 3)
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                if not renew(client, run_id, holder, ttl_s=ttl_s):
                    log.error("run %s: this driver's lease was taken over by %s; another driver may be training "
                              "the run", run_id, (current_holder(client, run_id) or ("nobody",))[0])
                    return
            except (MlflowException, OSError) as e:
                log.warning("run %s: could not renew the lease (%s); retrying", run_id, str(e).splitlines()[0][:200])

    renewer = threading.Thread(target=keep, name=f"lease-{run_id}", daemon=True)
    renewer.start()
    try:
        yield holder
    finally:
        stop.set()
        renewer.join(timeout=5)
        try:
            release(client, run_id, holder)
        except (MlflowException, OSError) as e:  # it expires by itself
            log.warning("run %s: could not release the lease (%s); it expires within %.0f s", run_id,
                        str(e).splitlines()[0][:200], ttl_s)
