"""Per-process settings for a worker that runs an engine."""
from __future__ import annotations

import asyncio
import os
import socket

import torch


def configure_process(torch_threads: int | None) -> None:
    """Pin torch's intra-op threads to the worker's CPU share: two workers on two cores
    each spinning two OpenMP threads slow each other down many times over."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def process_info() -> dict:
    info = {"pid": os.getpid(), "hostname": socket.gethostname(), "threads": torch.get_num_threads()}
    try:
        import ray
        ctx = ray.get_runtime_context()
        info["node_id"] = ctx.get_node_id()
        info["node_ip"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - not inside Ray
        info["node_id"] = info["node_ip"] = None
    return info


async def off_loop(fn, *args):
    """Run a blocking call in the default executor, keeping the actor's event loop free."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
