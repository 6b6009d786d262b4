"""The colocated worker: ONE engine that prefills and decodes in the same continuous batch.

It is the benchmark's baseline (spec `mode: colocated`): a prompt joins the running batch
and is computed in chunks under the step's token budget, beside the decode tokens of the
requests already running, so a long prompt lengthens the steps everyone else waits on.

A request's life on this worker, in order:
    1. start(rid, prompt, params, deliver, timeout_s)  validated, queued in the engine
    2. engine loop       the scheduler admits it when the budget and the KV pool allow;
                         every step's outputs go to the request's `deliver` callback
    3. finish            blocks return to the pool (full ones stay prefix-cached)
    4. cancel / expiry   cancel(rid), or the worker's own deadline (`timeout_s`), aborts
                         it wherever it is and frees its blocks at once

As in DecodeCore, the engine loop runs on its own thread and one lock serialises the
engine between that thread and the callers; the Ray actor wraps it in async methods.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loop import EngineLoop
from engine.output_processor import RequestOutput
from engine.runtime import configure_process, off_loop, process_info
from engine.sampling_params import SamplingParams

Deliver = Callable[[RequestOutput], None]


@dataclass
class ColocatedStats:
    running: int
    waiting: int
    queue_depth: int  # requests queued in the engine, not yet in the running batch
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    steps: int
    generated_tokens: int
    computed_tokens: int  # prompt and output tokens the model computed (incl. recomputation)
    preemptions: int
    expired: int  # requests aborted by the worker's own deadline


class ColocatedCore(EngineLoop):
    def __init__(self, config: EngineConfig, engine: Engine | None = None):
        super().__init__(engine or Engine(config), "colocated-loop")
        self._deliver: dict[str, Deliver] = {}
        self._deadlines: dict[str, float] = {}
        self.expired = 0
        self.start_loop()

    def start(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              deliver: Deliver, timeout_s: float | None = None) -> None:
        """Queues the request; each of its outputs goes to `deliver`, the last with finished=True.
        Raises InvalidRequestError (nothing queued) for a prompt this engine cannot hold."""
        with self.lock:
            self.engine.add_request(prompt_token_ids, params, request_id=request_id)
            self._deliver[request_id] = deliver
            if timeout_s is not None:
                self._deadlines[request_id] = time.monotonic() + timeout_s
            self.notify()

    def cancel(self, request_id: str) -> bool:
        """Aborts the request wherever it is; its `deliver` gets a final ABORT output."""
        with self.lock:
            deliver = self._deliver.pop(request_id, None)
            self._deadlines.pop(request_id, None)
            out = self.engine.abort(request_id)
        if deliver is not None and out is not None:
            deliver(out)
        return out is not None

    def stats(self) -> ColocatedStats:
        with self.lock:
            e = self.engine
            waiting = len(e.scheduler.waiting)
            return ColocatedStats(
                running=len(e.scheduler.running), waiting=waiting, queue_depth=waiting,
                kv_blocks_used=e.kv.pool.num_used, kv_blocks_total=e.kv.num_blocks,
                prefix_cache_hits=e.kv.pool.hits, prefix_cache_queries=e.kv.pool.queries,
                steps=e.stats.num_steps, generated_tokens=e.stats.num_generated_tokens,
                computed_tokens=e.stats.num_computed_tokens, preemptions=e.stats.num_preemptions,
                expired=self.expired)

    def close(self) -> None:
        self.stop_loop()

    def _expire(self) -> list[tuple[Deliver, RequestOutput]]:
        """Aborts requests past their deadline (the caller is gone or gave up); lock held."""
        now = time.monotonic()
        ended = []
        for rid in [r for r, t in self._deadlines.items() if t <= now]:
            self._deadlines.pop(rid)
            deliver = self._deliver.pop(rid, None)
            out = self.engine.abort(rid)
            self.expired += 1
            if deliver is not None and out is not None:
                ended.append((deliver, out))
        return ended

    def step_locked(self) -> list[tuple[Deliver, RequestOutput]]:
        callbacks = self._expire() if self._deadlines else []
        for o in self.engine.step():
            deliver = (self._deliver.pop(o.request_id, None) if o.finished
                       else self._deliver.get(o.request_id))
            if o.finished:
                self._deadlines.pop(o.request_id, None)
            if deliver is not None:
                callbacks.append((deliver, o))
        return callbacks


class ColocatedWorker:
    """Ray actor (the pool wraps it with ray.remote): ColocatedCore behind async methods."""

    def __init__(self, worker_id: str, config: EngineConfig, torch_threads: int | None = None):
        configure_process(torch_threads)
        self.worker_id = worker_id
        self.info = process_info()
        self.core = ColocatedCore(config)
        self.draining = False

    def ready(self) -> dict:
        e = self.core.engine
        return dict(self.info, worker_id=self.worker_id, block_size=e.kv.block_size,
                    num_blocks=e.kv.num_blocks, max_num_seqs=e.config.scheduler.max_num_seqs,
                    max_num_batched_tokens=e.config.scheduler.max_num_batched_tokens,
                    fingerprint=e.model_config.fingerprint)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       timeout_s: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutput deltas until the request finishes. Closing the stream early
        (client gone, deadline passed) aborts the request and frees its blocks."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        deliver = lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out)  # noqa: E731
        finished = False
        try:
            # Off the event loop: the engine lock is held while a step runs.
            await off_loop(self.core.start, request_id, list(prompt_token_ids), params, deliver,
                           timeout_s)
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:  # not awaited: a cancelled task must not wait out an engine step
                loop.run_in_executor(None, self.core.cancel, request_id)

    async def cancel(self, request_id: str) -> bool:
        return await off_loop(self.core.cancel, request_id)

    def set_draining(self, draining: bool = True) -> None:
        self.draining = draining

    async def stats(self) -> dict:
        return await off_loop(self._stats)

    def _stats(self) -> dict:
        stats = dataclasses.asdict(self.core.stats())
        stats.update(worker_id=self.worker_id, pool="colocated", draining=self.draining,
                     pid=self.info["pid"], node_id=self.info.get("node_id"),
                     loop_error=repr(self.core.loop_error) if self.core.loop_error else None)
        return stats

    def shutdown(self) -> None:
        self.core.close()
