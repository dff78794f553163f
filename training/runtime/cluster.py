"""What a run may assume of a cluster whose nodes share nothing: the credentials the driver forwards
(only when asked), and which of the driver's locations no other node can reach.

Nodes bring their own credentials (an instance role, a mounted profile, their own environment).
`ldmflow train --forward-credentials` instead hands the driver's own to every node through the Ray
job's runtime environment: never through the training config or the payload, which Ray keeps in
its run state and shows on the dashboard. (Ray's dashboard redacts runtime-environment variables
for browsers, but anyone who can submit work to the cluster can read them, as they can everything
on it.)
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse

from data_prep import storage
from training.errors import ConfigError
from training.locations import redact

FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""The credentials `--forward-credentials` hands to every node, those of them set here."""


def forwarded_credentials() -> dict[str, str]:
    """The FORWARDED_ENV variables set in this environment; ConfigError when there is none (a profile
    or an instance role on this machine cannot be forwarded: it is not a value to copy)."""
    found = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if not found:
        raise ConfigError(f"--forward-credentials: none of {', '.join(FORWARDED_ENV)} is set here, so there is "
                          "nothing to forward; set them, or drop the option and give every node its own credentials")
    return found


def check_job_forwards(current_env_vars: dict[str, str], wanted: dict[str, str]) -> None:
    """Refuse forwarding into a Ray job that was started without it: a job's runtime environment is
    fixed when the process joins Ray."""
    missing = sorted(k for k, v in wanted.items() if current_env_vars.get(k) != v)
    if missing:
        raise ConfigError(f"--forward-credentials: this process joined Ray earlier without forwarding "
                          f"{', '.join(missing)}; forward them from a fresh process (or ray.shutdown() first)")


# ------------------------------------------------------------------------------ node-local locations


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def driver_ip() -> str | None:
    """The address of the Ray node this driver runs on; None for a Ray Client driver (ray://), which
    runs on no node of the cluster."""
    import ray

    if os.environ.get("RAY_ADDRESS", "").startswith("ray://"):
        return None
    me = ray.get_runtime_context().get_node_id()
    return next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == me), None)


def node_local_problems(storage_uri: str, *, storage_given: bool, tracking_uri: str, node_ips: list[str],
                        driver_ip: str | None) -> list[str]:
    """What a cluster of the nodes at `node_ips` (one entry per alive node) cannot share with this
    driver: the default local storage folder, and a tracking store only this machine holds.

    - storage: the *default* (`runs/ray`, nothing given) on more than one node. A local path given
      explicitly may be a shared mount (NFS): it is allowed here, and every worker's pre-flight
      checks that it sees the driver's marker in it (training.runtime.preflight).
    - tracking: a SQLite or file store on more than one node (each node would write its own file);
      a loopback host (localhost, 127.x, ::1) when a node runs on another host than this driver.
    """
    problems: list[str] = []
    if len(node_ips) > 1 and not storage_given and not storage.is_s3(storage_uri):
        problems.append(f"checkpoints would go to the default {storage_uri} of each node: pass --storage "
                        "s3://bucket/prefix (or a path on a mount every node shares, or set LDMFLOW_STORAGE)")
    parts = urllib.parse.urlsplit(tracking_uri)
    scheme = parts.scheme.lower()
    fix = "set MLFLOW_TRACKING_URI=http://<host every node reaches>:5000 (an MLflow server)"
    if len(node_ips) > 1 and (scheme in ("sqlite", "file", "") or len(scheme) == 1):  # "" or C: is a path
        problems.append(f"MLflow tracking is the store {redact(tracking_uri)} on this machine only: {fix}")
    elif _is_loopback(parts.hostname) and any(ip != driver_ip for ip in node_ips):
        problems.append(f"MLflow tracking is {redact(tracking_uri)}, which only this machine reaches: {fix}")
    return problems


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_node_local(storage_uri: str, *, storage_given: bool, tracking_uri: str) -> None:
    """ConfigError, before any worker starts, when the joined cluster cannot share the run's storage
    or tracking store with this driver (node_local_problems). A one-node cluster passes."""
    nodes = alive_nodes()
    problems = node_local_problems(storage_uri, storage_given=storage_given, tracking_uri=tracking_uri,
                                   node_ips=[n["NodeManagerAddress"] for n in nodes],
                                   driver_ip=driver_ip())
    if problems:
        raise ConfigError(f"the Ray cluster has {len(nodes)} nodes, which share no local disk: "
                          + "; and ".join(problems))
