"""The decode worker as a Ray actor: DecodeCore behind async methods.

Tokens stream back through a Ray streaming generator; if the caller cancels the
stream (client gone, deadline passed), the generator's finally frees the request's
blocks at once.
"""
from __future__ import annotations

import asyncio
import dataclasses

import ray

from decode_worker.core import DecodeCore
from engine.config import EngineConfig
from engine.runtime import configure_process, off_loop as _off_loop, process_info
from engine.sampling_params import SamplingParams
from kv_transfer.base import Lease
from kv_transfer.factory import listener_factory


class DecodeWorker:
    def __init__(self, worker_id: str, config: EngineConfig, transport: str = "ucx",
                 lease_ttl_s: float = 30.0, torch_threads: int | None = None,
                 host: str | None = None):
        configure_process(torch_threads)
        self.worker_id = worker_id
        self.info = process_info()
        host = host or self.info.get("node_ip") or "127.0.0.1"
        # NCCL lands payloads in GPU memory; UCX here moves host memory.
        self.core = DecodeCore(config, listener_factory(transport, host), lease_ttl_s,
                               staging_on_device=transport == "nccl")
        self.draining = False

    def ready(self) -> dict:
        kv = self.core.engine.kv
        return dict(self.info, worker_id=self.worker_id, address=self.core.address,
                    block_size=kv.block_size, num_blocks=kv.num_blocks,
                    max_num_seqs=self.core.engine.config.scheduler.max_num_seqs,
                    fingerprint=self.core.engine.model_config.fingerprint)

    async def reserve(self, request_id: str, num_tokens: int, ttl_s: float | None = None) -> Lease:
        # Off the event loop: the pool's lock is held while the engine steps.
        return await _off_loop(self.core.reserve, request_id, num_tokens, ttl_s)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       timeout_s: float = 60.0):
        """Yields RequestOutput deltas until the request finishes."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        deliver = lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out)  # noqa: E731
        finished = False
        try:
            await loop.run_in_executor(None, self.core.start, request_id, list(prompt_token_ids),
                                       params, deliver, timeout_s)
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.core.cancel(request_id)

    async def cancel(self, request_id: str) -> bool:
        return await _off_loop(self.core.cancel, request_id)

    def set_draining(self, draining: bool = True) -> None:
        self.draining = draining

    async def stats(self) -> dict:
        return await _off_loop(self._stats)

    def _stats(self) -> dict:
        stats = dataclasses.asdict(self.core.stats())
        stats.update(worker_id=self.worker_id, pool="decode", draining=self.draining,
                     pid=self.info["pid"], node_id=self.info.get("node_id"),
                     transfer_seconds=list(self.core.receiver.stats.seconds[-100:]),
                     loop_error=repr(self.core.loop_error) if self.core.loop_error else None)
        return stats

    def shutdown(self) -> None:
        self.core.close()


RemoteDecodeWorker = ray.remote(DecodeWorker)
