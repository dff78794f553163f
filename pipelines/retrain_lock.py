"""One retrain of a model at a time: a Prefect global concurrency limit of 1 slot per model name.

The limit is created if missing and then taken with strict=True: a non-strict `concurrency()` on a
limit that does not exist limits nothing (Prefect only logs a warning), so a typo or a fresh server
would let two retrains train and register at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

LIMIT_PREFIX = "ldmflow-retrain-"
SLOT_LEASE_S = 60.0
"""The slot's lease, which the holding flow run renews every 45 s: a retrain whose process was killed (its
worker lost) frees the slot within a minute, so rerunning it does not wait out Prefect's default 300 s."""


class RetrainBusy(RuntimeError):
    """Another retrain of the same model holds its slot."""


def limit_name(model_name: str) -> str:
    return f"{LIMIT_PREFIX}{model_name}"


def ensure_limit(name: str, slots: int = 1) -> None:
    """Create the global concurrency limit `name` with `slots` slots unless it exists (a race with
    another flow creating it is fine: one of the two creates it)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:
            pass


@contextmanager
def retrain_slot(model_name: str, *, wait_s: float | None) -> Iterator[str]:
    """Hold model `model_name`'s retrain slot for the block. `wait_s`: None waits as long as it takes,
    0 refuses at once when another retrain holds it, more waits that long; refusing raises RetrainBusy."""
    from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError

    name = limit_name(model_name)
    ensure_limit(name)
    options = {"max_retries": 0} if wait_s == 0 else {"timeout_seconds": wait_s}
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(name, occupy=1, strict=True, lease_duration=SLOT_LEASE_S, **options))
        except (AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError) as e:
            waited = "at once" if wait_s == 0 else f"after waiting {wait_s:g} s"
            raise RetrainBusy(f"another retrain of {model_name!r} holds the concurrency limit {name!r}; refused "
                              f"{waited} (flow parameter lock_wait_s waits longer)") from e
        yield name
