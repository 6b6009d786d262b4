"""Per-process settings for a worker that runs an engine."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket

import torch


def configure_process(torch_threads: int | None) -> None:
    """Pin torch's intra-op threads to the worker's CPU share: two workers on two cores
    each spinning two OpenMP threads slow each other down many times over."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
# glibc's upper bound for M_MMAP_THRESHOLD on 64-bit; a prefill step's largest activation
# (2048 rows x 3072 float32 of the default model's gate+up) is 25 MB.
_MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory() -> bool:
    """Let glibc reuse freed activation buffers instead of returning them to the OS.

    By default glibc serves allocations over 128 KB-32 MB with fresh mmaps and unmaps them on
    free, so every prefill step faults in its activations again: ~100k page faults and ~0.5 s
    of kernel time in a 2.7 s step of 2048 tokens here. Raising the mmap and trim thresholds
    keeps those pages in the heap (the process's RSS stays at its peak, as a GPU caching
    allocator's does). Returns False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.debug("mallopt unavailable; activation buffers are mapped afresh each step")
    return ok


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS once (glibc malloc_trim), e.g. the plain weights
    a model dropped after packing them: keep_freed_memory's trim threshold otherwise keeps
    them in the process's RSS. Returns False where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


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
