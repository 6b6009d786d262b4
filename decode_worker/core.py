"""Decode worker core: reserves blocks, receives KV, decodes with continuous batching.

A request's life on this worker, in order:
    1. reserve(rid, n)    blocks leased for the prompt's KV      (receiver: RESERVED)
    2. KV lands           the link's thread writes each layer    (TRANSFERRING -> READY)
    3. start(rid, ...)    waits for READY, hands the blocks and the first token to the
                          engine, which joins the request to the running batch
    4. engine loop        every step's outputs go to the request's `deliver` callback
    5. finish / cancel    blocks return to the pool (full ones stay prefix-cached)

The engine loop runs on its own thread; one lock serialises the engine and the
block pool between that thread, the receiver's threads and the callers. Lock order:
the receiver's lock may be held while taking the engine's (to free blocks), never
the other way round.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loop import EngineLoop
from engine.output_processor import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.base import Lease, TransferError, TransferState
from kv_transfer.receiver import KVReceiver
from kv_transfer.store import KVCacheStore

Deliver = Callable[[RequestOutput], None]


@dataclass
class DecodeStats:
    running: int
    waiting: int
    pending_transfers: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    bytes_received: int
    leases_expired: int
    transfers_failed: int
    transfers_ready: int
    messages_refused: int
    wire_garbage_frames: int
    steps: int
    generated_tokens: int


class DecodeCore(EngineLoop):
    def __init__(self, config: EngineConfig, listener_factory, lease_ttl_s: float = 30.0,
                 engine: Engine | None = None, staging_on_device: bool = False):
        super().__init__(engine or Engine(config), "decode-loop")
        mc = self.engine.model_config
        self.receiver = KVReceiver(
            KVCacheStore(self.engine.kv, self.lock), listener_factory,
            model_fingerprint=mc.fingerprint, num_layers=mc.num_layers,
            kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, lease_ttl_s=lease_ttl_s,
            staging_device=self.engine.device if staging_on_device else "cpu")
        self._deliver: dict[str, Deliver] = {}
        self.start_loop()

    @property
    def address(self):
        return self.receiver.address

    def reserve(self, request_id: str, num_tokens: int, ttl_s: float | None = None) -> Lease:
        """Blocks for `num_tokens` of prompt KV; raises NoFreeBlocksError when the pool is short."""
        return self.receiver.reserve(request_id, num_tokens, ttl_s)

    def start(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              deliver: Deliver, timeout_s: float = 30.0) -> None:
        """Waits for the KV, then decodes; every output (the first token's too) goes to `deliver`.
        Raises TransferError if the KV does not arrive (its blocks are already freed)."""
        state = self.receiver.wait(request_id, timeout_s)
        if state != TransferState.READY:
            self.receiver.cancel(request_id, "no KV within the decode worker's timeout")
            reason = self.receiver.error(request_id) or f"state {state.name if state else None}"
            raise TransferError(f"KV for {request_id!r} did not arrive: {reason}")
        blocks, first_token = self.receiver.take(request_id)
        with self.lock:
            try:
                out = self.engine.add_prefilled_request(prompt_token_ids, first_token, blocks,
                                                        params, request_id=request_id)
            except Exception:
                self.engine.release_blocks(blocks)
                raise
            if not out.finished:
                self._deliver[request_id] = deliver
                self.notify()
        deliver(out)

    def cancel(self, request_id: str) -> bool:
        """Frees the request's blocks wherever it is (leased, receiving, or decoding)."""
        freed = self.receiver.cancel(request_id, "cancelled")
        with self.lock:
            deliver = self._deliver.pop(request_id, None)
            out = self.engine.abort(request_id)
        if deliver is not None and out is not None:
            deliver(out)
        return freed or out is not None

    def stats(self) -> DecodeStats:
        # Lock order is receiver -> engine (the receiver frees blocks under its own lock), so
        # the receiver is read first, never while holding the engine's lock.
        pending, rx = self.receiver.num_pending, self.receiver.stats
        with self.lock:
            e = self.engine
            return DecodeStats(
                running=len(e.scheduler.running), waiting=len(e.scheduler.waiting),
                pending_transfers=pending, kv_blocks_used=e.kv.pool.num_used,
                kv_blocks_total=e.kv.num_blocks, prefix_cache_hits=e.kv.pool.hits,
                prefix_cache_queries=e.kv.pool.queries, bytes_received=rx.bytes_received,
                leases_expired=rx.leases_expired, transfers_failed=rx.transfers_failed,
                transfers_ready=rx.transfers_ready, messages_refused=rx.messages_refused,
                wire_garbage_frames=getattr(self.receiver.listener, "garbage_frames", 0),
                steps=e.stats.num_steps, generated_tokens=e.stats.num_generated_tokens)

    def close(self) -> None:
        self.stop_loop()
        self.receiver.close()

    def step_locked(self) -> list:
        outputs = self.engine.step()
        callbacks = [(self._deliver[o.request_id], o) for o in outputs if o.request_id in self._deliver]
        for o in outputs:
            if o.finished:
                self._deliver.pop(o.request_id, None)
        return callbacks
