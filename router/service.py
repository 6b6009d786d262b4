"""A request's life in the router, from admission to its last token.

    admit       bounded: past max_pending_requests -> RESOURCE_EXHAUSTED at once
    pick        the policy chooses a (prefill, decode) pair from fresh worker views;
                while no decode has room, wait (never over-commit) until the deadline
    reserve     the decode worker leases blocks for the KV to land in
    prefill     the prefill worker computes the prompt and pushes its KV into the lease
    stream      the decode worker's streaming generator yields token deltas
    finish      counted in the metrics; a cancel or deadline frees both sides at once

Failures retry on another pair: a dead prefill worker re-prefills elsewhere; a dead
decode worker re-prefills the prompt plus the tokens already streamed, so the stream
continues where it stopped.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray

from engine.output_processor import RequestOutput
from engine.request import FinishReason
from router.errors import RouterError, StatusCode
from router.policy import DecodeView, NoPair, NoPairReason, PrefillView, choose_pair
from router.prefix_index import PrefixIndex
from router.validation import ParsedRequest

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4  # pairs tried for one request before giving up


@dataclass
class Progress:
    """What the client has been sent so far: enough to resume on another pair."""

    request_id: str
    prompt: list[int]
    sent: list[int] = dataclasses.field(default_factory=list)
    first_token_at: float | None = None
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None  # first pick succeeded
    cached_tokens: int = 0


class Router:
    def __init__(self, pools, *, max_pending: int, request_timeout_s: float,
                 decode_timeout_s: float = 60.0):
        self.pools = pools  # name -> cluster.pools.Pool
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self.decode_timeout_s = decode_timeout_s
        self.prefix_index = PrefixIndex()
        self.active: dict[str, Progress] = {}
        self.counts = dict(admitted=0, finished=0, failed=0, cancelled=0, rejected=0)
        self.draining = False  # shutting down: refuse new requests, finish the admitted ones
        self._ids = itertools.count()

    # -- admission ---------------------------------------------------------------

    def admit(self, parsed: ParsedRequest) -> Progress:
        if self.draining:
            self.counts["rejected"] += 1
            raise RouterError(StatusCode.UNAVAILABLE, "the server is shutting down and takes no "
                              "new requests; retry on another replica or after it restarts")
        if len(self.active) >= self.max_pending:
            self.counts["rejected"] += 1
            raise RouterError(StatusCode.RESOURCE_EXHAUSTED,
                              f"the server has {len(self.active)} requests in flight "
                              f"(router.max_pending_requests); retry later")
        rid = parsed.request_id or f"{uuid.uuid4().hex[:16]}"
        if rid in self.active:
            raise RouterError(StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already in flight")
        progress = Progress(rid, list(parsed.prompt_token_ids))
        self.active[rid] = progress
        self.counts["admitted"] += 1
        return progress

    def release(self, progress: Progress, outcome: str) -> None:
        if self.active.pop(progress.request_id, None) is not None:
            self.counts[outcome] += 1

    async def drain(self, timeout_s: float) -> int:
        """Stops admitting and waits up to `timeout_s` for the admitted requests to end;
        returns how many are still in flight (0: drained)."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self.active)

    # -- picking a pair ----------------------------------------------------------

    def _views(self, tokens: list[int]):
        prefill, decode = self.pools["prefill"], self.pools["decode"]
        known = set(self.prefix_index.worker_ids)
        for w in prefill.workers.values():
            if w.worker_id not in known:
                self.prefix_index.add_worker(w.worker_id, w.info.get("block_size", 16),
                                             w.info.get("num_blocks", 1024))
        for gone in known - set(prefill.workers):
            self.prefix_index.remove_worker(gone)
        overlaps = self.prefix_index.overlaps(tokens)
        pviews = []
        for w in prefill.workers.values():
            s = w.stats
            pviews.append(PrefillView(
                w.worker_id, w.alive, w.draining, s.get("queue_depth", 0) + w.inflight,
                s.get("queued_tokens", 0), overlaps.get(w.worker_id, 0),
                w.info.get("block_size", 16)))
        dviews = []
        for w in decode.workers.values():
            s = w.stats
            total = s.get("kv_blocks_total", w.info.get("num_blocks", 0))
            dviews.append(DecodeView(
                w.worker_id, w.alive, w.draining, max(0, total - s.get("kv_blocks_used", 0)),
                max(total, 1), s.get("running", 0) + w.inflight, s.get("waiting", 0),
                w.info.get("max_num_seqs", 256), w.info.get("block_size", 16)))
        return pviews, dviews

    async def pick(self, tokens: list[int], deadline: float, exclude: set[str]):
        """The (prefill, decode) workers for these tokens; waits while decode is full."""
        delay = 0.02
        while True:
            pviews, dviews = self._views(tokens)
            # Workers that failed this request are avoided, unless nothing else is left.
            choice = choose_pair([v for v in pviews if v.worker_id not in exclude],
                                 [v for v in dviews if v.worker_id not in exclude], len(tokens))
            if isinstance(choice, NoPair) and exclude:
                choice = choose_pair(pviews, dviews, len(tokens))
            if not isinstance(choice, NoPair):
                return (self.pools["prefill"].workers[choice.prefill_id],
                        self.pools["decode"].workers[choice.decode_id], choice.lease_blocks)
            if choice.reason is NoPairReason.TOO_LARGE:
                raise RouterError(StatusCode.INVALID_ARGUMENT, f"prompt: {choice.detail}")
            if time.monotonic() + delay > deadline:
                code = (StatusCode.UNAVAILABLE if choice.reason in
                        (NoPairReason.NO_PREFILL, NoPairReason.NO_DECODE)
                        else StatusCode.RESOURCE_EXHAUSTED)
                raise RouterError(code, choice.detail)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- the request -------------------------------------------------------------

    async def generate(self, parsed: ParsedRequest, progress: Progress,
                       deadline: float) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; raises RouterError when it cannot be served.
        An attempt that fails resumes on other workers from the prompt plus the tokens
        already sent, so the client sees no token twice and none skipped."""
        params = parsed.params
        exclude: set[str] = set()
        for attempt in range(MAX_ATTEMPTS):
            tokens = progress.prompt + progress.sent
            remaining = params.max_tokens - len(progress.sent)
            attempt_params = dataclasses.replace(params, max_tokens=remaining)
            rid = f"{progress.request_id}#{attempt}" if attempt else progress.request_id
            outputs = await self._begin(rid, tokens, attempt_params, deadline, exclude)
            progress.started_at = progress.started_at or time.monotonic()
            try:
                async for out in outputs:
                    progress.sent += out.new_token_ids
                    if out.new_token_ids and progress.first_token_at is None:
                        progress.first_token_at = time.monotonic()
                        progress.cached_tokens = out.num_cached_tokens
                    yield out
                    if out.finished:
                        return
            except AttemptFailed as failure:
                log.warning("request %s: %s; retrying elsewhere", rid, failure)
                exclude.add(failure.worker_id)
        raise RouterError(StatusCode.UNAVAILABLE,
                          f"request {progress.request_id!r} failed on {MAX_ATTEMPTS} attempts")

    async def _begin(self, rid: str, tokens: list[int], params, deadline: float,
                     exclude: set[str]) -> AsyncIterator[RequestOutput]:
        """Picks where this attempt runs (waiting for room) and returns its outputs."""
        prefill, decode, _ = await self.pick(tokens, deadline, exclude)
        return self._run_pair(rid, tokens, params, prefill, decode, deadline)

    async def _run_pair(self, rid: str, tokens: list[int], params, prefill, decode, deadline):
        try:
            lease = await decode.actor.reserve.remote(rid, len(tokens))
        except ray.exceptions.RayActorError as exc:
            self.pools["decode"].mark_dead(decode)
            raise AttemptFailed(decode.worker_id, f"decode worker died: {exc}") from None
        except Exception as exc:  # no room after all (views lag): try again, maybe elsewhere
            raise AttemptFailed(decode.worker_id, f"reserve failed: {exc}") from None
        # the lease's blocks are taken now: reflect it before the next refresh
        decode.stats["kv_blocks_used"] = decode.stats.get("kv_blocks_used", 0) + len(lease.block_ids)
        prefill.inflight += 1
        decode.inflight += 1
        self.prefix_index.record(prefill.worker_id,
                                 self.prefix_index.hashes(prefill.worker_id, tokens))
        prefill_ref = prefill.actor.prefill.remote(rid, tokens, params, lease)
        watcher = asyncio.ensure_future(self._watch_prefill(prefill, decode, rid, prefill_ref))
        stream = decode.actor.generate.remote(rid, tokens, params, self.decode_timeout_s)
        finished = False
        try:
            async for ref in stream:
                out = await ref
                finished = out.finished
                yield out
        except ray.exceptions.RayActorError as exc:
            self.pools["decode"].mark_dead(decode)
            raise AttemptFailed(decode.worker_id, f"decode worker died: {exc}") from None
        except ray.exceptions.RayTaskError as exc:
            failed = await watcher
            culprit = prefill.worker_id if failed else decode.worker_id
            raise AttemptFailed(culprit, f"{exc.cause if hasattr(exc, 'cause') else exc}") from None
        finally:
            prefill.inflight -= 1
            decode.inflight -= 1
            if not finished:  # cancelled, failed or deadline: free both sides now
                ray.cancel(stream)
                for worker in (prefill, decode):
                    if worker.alive:
                        worker.actor.cancel.remote(rid)
            if not watcher.done():
                watcher.cancel()

    async def _watch_prefill(self, prefill, decode, rid: str, ref) -> bool:
        """True if the prefill failed; then the decode side's lease is cancelled at once so
        its stream ends now rather than at the KV timeout."""
        try:
            await ref
            return False
        except ray.exceptions.RayActorError:
            self.pools["prefill"].mark_dead(prefill)
        except Exception as exc:  # noqa: BLE001 - transfer failures end up here
            log.info("prefill of %s failed: %s", rid, exc)
        try:
            await decode.actor.cancel.remote(rid)
        except Exception:  # noqa: BLE001 - the decode worker may be gone too
            pass
        return True


class AttemptFailed(Exception):
    """An attempt failed for a reason another worker may not have; `worker_id` is the
    worker to avoid on the next attempt."""

    def __init__(self, worker_id: str, message: str):
        super().__init__(message)
        self.worker_id = worker_id


def finish_outcome(reason: FinishReason | None) -> str:
    return "cancelled" if reason == FinishReason.ABORT else "finished"
