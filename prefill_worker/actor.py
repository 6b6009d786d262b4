"""The prefill worker as a Ray actor: PrefillCore behind async methods."""
from __future__ import annotations

import asyncio

import ray

from engine.config import EngineConfig
from engine.runtime import configure_process, off_loop as _off_loop, process_info
from engine.sampling_params import SamplingParams
from kv_transfer.base import Lease
from kv_transfer.factory import make_link
from prefill_worker.core import PrefillCore


class PrefillWorker:
    def __init__(self, worker_id: str, config: EngineConfig, transport: str = "ucx",
                 send_timeout_s: float = 30.0, torch_threads: int | None = None,
                 host: str | None = None, faults: dict | None = None):
        configure_process(torch_threads)
        self.worker_id = worker_id
        self.info = process_info()
        host = host or self.info.get("node_ip") or "127.0.0.1"
        self.core = PrefillCore(config, make_link(transport, host, faults), send_timeout_s=send_timeout_s)
        self.draining = False

    def ready(self) -> dict:
        kv = self.core.engine.kv
        return dict(self.info, worker_id=self.worker_id, block_size=kv.block_size,
                    num_blocks=kv.num_blocks,
                    fingerprint=self.core.engine.model_config.fingerprint)

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      lease: Lease) -> int:
        """Runs the prompt, pushes its KV into the lease; returns the first token."""
        future = await _off_loop(self.core.submit, request_id, list(prompt_token_ids), params, lease)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.core.cancel(request_id)
            raise

    async def cancel(self, request_id: str) -> bool:
        return await _off_loop(self.core.cancel, request_id)

    def set_draining(self, draining: bool = True) -> None:
        self.draining = draining

    async def stats(self) -> dict:
        return await _off_loop(self._stats)

    def _stats(self) -> dict:
        stats = self.core.stats()
        stats.update(worker_id=self.worker_id, pool="prefill", draining=self.draining,
                     pid=self.info["pid"], node_id=self.info.get("node_id"),
                     loop_error=repr(self.core.loop_error) if self.core.loop_error else None)
        return stats

    def shutdown(self) -> None:
        self.core.close()


RemotePrefillWorker = ray.remote(PrefillWorker)
