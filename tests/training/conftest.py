"""Shared fixtures of the training tests."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="module")
def process_group():
    """One gloo group of 1 for the module. DeepSpeed caches its groups: forget those an earlier
    module's (destroyed) group left behind, and release ours through deepspeed.comm at the end."""
    import deepspeed.comm
    import torch.distributed as dist
    from deepspeed.utils import groups

    groups._release_process_group_references(None)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        if deepspeed.comm.comm.cdb is not None:  # DeepSpeed ran here: release its references too
            deepspeed.comm.destroy_process_group()
        else:
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
