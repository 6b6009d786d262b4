"""Continuous batching under a token budget, with chunked prefill and preemption.

Each step:
  1. Running requests, oldest first, get the tokens they still need (one for a
     decoding request, a budgeted chunk for a prefilling one). When the KV pool
     cannot hold a request's new tokens, the newest running request is preempted:
     its blocks go back to the pool (full ones stay in the prefix cache) and it
     returns to the front of the waiting queue, to be recomputed later.
  2. If nothing was preempted, waiting requests join in arrival order while the
     budget, the batch size and the pool allow; each first takes what the prefix
     cache already holds of its tokens.
Requests leave when the engine finishes them; their blocks are freed at once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_pool import hash_full_blocks
from engine.config import SchedulerConfig
from engine.kv_cache import KVCache
from engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so it samples the next."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # could not fit even alone

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCache):
        self.config = config
        self.kv = kv_cache
        self.pool = kv_cache.pool
        self.block_size = kv_cache.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            # Make room by preempting from the back; stop if that reaches `req` itself.
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running.pop()
                if victim is req and i == 0:
                    # Alone in the batch and still too big for the whole pool.
                    self.finish(req, FinishReason.LENGTH)
                    out.finished.append(req)
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            # A request imported with its KV already holds blocks; only a fresh or
            # preempted one looks in the prefix cache (and gives those back on failure).
            fresh = not req.block_ids
            if fresh:
                self._take_cached_prefix(req)
            remaining = req.num_tokens - req.num_computed_tokens
            n = min(remaining, budget)
            fits_budget = remaining <= budget or self.config.enable_chunked_prefill
            if not fits_budget or not self._grow(req, req.num_computed_tokens + n):
                if fresh:
                    self._drop_blocks(req)
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n

    def update(self, out: SchedulerOutput) -> None:
        """Advance the counters of what was computed; full blocks join the prefix cache."""
        for item in out.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            self._cache_full_blocks(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._drop_blocks(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    # -- blocks --------------------------------------------------------------

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Ensure `req` has blocks for `num_tokens` tokens; False if the pool is short."""
        need = self.kv.blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.block_ids.extend(self.pool.allocate(need))
        return True

    def _drop_blocks(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_cached_blocks = 0

    def _preempt(self, req: Request) -> None:
        self._drop_blocks(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _hash_blocks(self, req: Request) -> None:
        known_full = len(req.token_ids) // self.block_size
        if len(req.block_hashes) < known_full:
            start = len(req.block_hashes) * self.block_size
            parent = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes += hash_full_blocks(
                req.token_ids[start:known_full * self.block_size], self.block_size, parent)

    def _take_cached_prefix(self, req: Request) -> None:
        self._hash_blocks(req)
        hits = self.pool.lookup(req.block_hashes, req.token_ids, self.block_size)
        if len(hits) * self.block_size >= req.num_tokens:
            hits = hits[:-1]  # at least one token must be computed to get logits
        self.pool.touch(hits)
        req.block_ids = list(hits)
        req.num_computed_tokens = len(hits) * self.block_size
        req.num_cached_blocks = len(hits)
        req.num_prefix_hit_tokens = max(req.num_prefix_hit_tokens, req.num_computed_tokens)

    def _cache_full_blocks(self, req: Request) -> None:
        if not self.pool.enable_prefix_caching:
            return
        full = req.num_computed_tokens // self.block_size
        if full <= req.num_cached_blocks:
            return
        self._hash_blocks(req)
        bs = self.block_size
        for j in range(req.num_cached_blocks, full):
            self.pool.cache_block(req.block_ids[j], req.block_hashes[j],
                                  req.token_ids[j * bs:(j + 1) * bs])
        req.num_cached_blocks = full
