"""The router of `mode: colocated`: one pool whose workers both prefill and decode.

A request's life, as in the disaggregated Router (admission, deadline, cancel and release
are the same; the gRPC servicer cannot tell the two apart):

    admit       bounded: past max_pending_requests -> RESOURCE_EXHAUSTED at once
    pick        `choose_worker` over fresh views of the pool: the routable worker with the
                most free KV blocks and the least load; while none has room for the
                prompt, wait (never over-commit) until the deadline
    stream      the worker's streaming generator yields token deltas
    finish      a cancel or the deadline closes the stream, which frees the worker's blocks

A worker that dies mid-stream is marked dead and the request continues on another one
from the prompt plus the tokens already sent.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import ray

from engine.output_processor import RequestOutput
from engine.sampling_params import InvalidRequestError
from router.errors import RouterError, StatusCode
from router.policy import DecodeView, NoPair, NoPairReason, PolicyWeights, choose_decode
from router.service import AttemptFailed, Router

log = logging.getLogger(__name__)

POOL = "colocated"


def choose_worker(workers: Sequence[DecodeView], num_prompt_tokens: int,
                  weights: PolicyWeights = PolicyWeights()) -> str | NoPair:
    """The worker for a prompt of `num_prompt_tokens`, or why there is none: the decode side
    of `choose_pair` (a colocated worker holds the prompt's KV and decodes it)."""
    if num_prompt_tokens < 1:
        raise ValueError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
    choice = choose_decode(workers, num_prompt_tokens, weights, kind=POOL)
    return choice if isinstance(choice, NoPair) else choice.worker_id


def worker_view(worker) -> DecodeView:
    """A pool Worker's latest stats as the policy sees them; routed-but-unseen requests count."""
    s, info = worker.stats, worker.info
    total = s.get("kv_blocks_total", info.get("num_blocks", 0))
    return DecodeView(worker.worker_id, worker.alive, worker.draining,
                      max(0, total - s.get("kv_blocks_used", 0)), max(total, 1),
                      s.get("running", 0) + worker.inflight, s.get("waiting", 0),
                      info.get("max_num_seqs", 256), info.get("block_size", 16))


class ColocatedRouter(Router):
    """Router.admit/release/active/counts as they are; pick and generate over one pool."""

    def __init__(self, pools, *, max_pending: int, request_timeout_s: float,
                 weights: PolicyWeights = PolicyWeights()):
        super().__init__(pools, max_pending=max_pending, request_timeout_s=request_timeout_s)
        self.weights = weights

    @property
    def pool(self):
        return self.pools[POOL]

    async def pick(self, tokens: list[int], deadline: float, exclude: set[str]):
        """The worker for these tokens; waits while every worker is full."""
        delay = 0.02
        while True:
            views = [worker_view(w) for w in self.pool.workers.values()
                     if w.worker_id not in exclude]
            choice = choose_worker(views, len(tokens), self.weights)
            if not isinstance(choice, NoPair):
                return self.pool.workers[choice]
            if choice.reason is NoPairReason.TOO_LARGE:
                raise RouterError(StatusCode.INVALID_ARGUMENT, f"prompt: {choice.detail}")
            if time.monotonic() + delay > deadline:
                code = (StatusCode.UNAVAILABLE if choice.reason is NoPairReason.NO_DECODE
                        else StatusCode.RESOURCE_EXHAUSTED)
                raise RouterError(code, choice.detail)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _begin(self, rid: str, tokens: list[int], params, deadline: float,
                     exclude: set[str]) -> AsyncIterator[RequestOutput]:
        worker = await self.pick(tokens, deadline, exclude)
        return self._run_worker(rid, tokens, params, worker, deadline)

    async def _run_worker(self, rid: str, tokens: list[int], params, worker, deadline: float):
        blocks = -(-len(tokens) // worker.info.get("block_size", 16))
        # the prompt's blocks will be taken: reflect it before the next refresh
        worker.stats["kv_blocks_used"] = worker.stats.get("kv_blocks_used", 0) + blocks
        worker.inflight += 1
        timeout_s = max(0.0, deadline - time.monotonic())
        stream = worker.actor.generate.remote(rid, tokens, params, timeout_s)
        finished = False
        try:
            async for ref in stream:
                out = await ref
                finished = out.finished
                yield out
        except ray.exceptions.RayActorError as exc:
            self.pool.mark_dead(worker)
            raise AttemptFailed(worker.worker_id, f"worker {worker.worker_id} died: {exc}") from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, InvalidRequestError):  # the engine refused the prompt itself
                raise RouterError(StatusCode.INVALID_ARGUMENT, str(cause)) from None
            raise AttemptFailed(worker.worker_id,
                                f"worker {worker.worker_id} failed: {cause or exc}") from None
        finally:
            worker.inflight -= 1
            if not finished:  # cancelled, failed or deadline: free the worker's blocks now
                ray.cancel(stream)
                if worker.alive:
                    worker.actor.cancel.remote(rid)

