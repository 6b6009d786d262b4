"""Which (prefill, decode) pair serves a request: a pure function of the workers' views.

Prefill workers are ranked by the work ahead of the request's first token, in tokens:

    cost = queued_tokens + per_request_tokens * queue_depth
           + num_prompt_tokens - prefix_weight * cached_tokens

where cached_tokens = prefix_overlap_blocks * block_size (capped at the prompt). One unit for
queue and prefix overlap lets them trade off directly: a cached token saves one token of
compute, a queued one costs one. Lowest cost wins.

Decode workers must have room for the lease now (ceil(num_prompt_tokens / block_size) free
blocks, the worker's own block size) and must be able to hold the prompt plus the first
generated token at all (as Engine.validate_prompt checks). Among those:

    score = headroom_weight * (free_blocks - lease_blocks) / total_blocks
            - load_weight * (running + waiting) / max_num_seqs

so a worker keeps room for its running requests to grow and batches stay balanced. Highest
score wins. Dead and draining workers are never picked; ties go to the lowest worker_id.

The two scores do not depend on each other, so the best pair is the best of each pool; a pair
term (transfer cost between nodes) would make this a search over pairs.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields


def _check_non_negative(view: object) -> None:
    for f in fields(view):  # type: ignore[arg-type]
        value = getattr(view, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
            raise ValueError(f"{type(view).__name__}.{f.name} must be >= 0, got {value}")


@dataclass(frozen=True)
class PrefillView:
    worker_id: str
    alive: bool
    draining: bool
    queue_depth: int  # requests queued or being prefilled
    queued_tokens: int  # prompt tokens those requests have left to compute
    prefix_overlap_blocks: int  # the prompt's leading blocks in its cache (PrefixIndex.overlap)
    block_size: int

    def __post_init__(self) -> None:
        _check_non_negative(self)
        if self.block_size < 1:
            raise ValueError(f"PrefillView.block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class DecodeView:
    worker_id: str
    alive: bool
    draining: bool
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int
    max_num_seqs: int
    block_size: int

    def __post_init__(self) -> None:
        _check_non_negative(self)
        if self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError(f"DecodeView.block_size and max_num_seqs must be >= 1, "
                             f"got {self.block_size} and {self.max_num_seqs}")

    def lease_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class PolicyWeights:
    per_request_tokens: float = 32.0  # fixed cost of a queued request (scheduling, handoff)
    prefix_weight: float = 1.0  # tokens of work one cached prompt token saves
    headroom_weight: float = 1.0
    load_weight: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PolicyWeights.{f.name} must be finite and >= 0, got {value}")


class NoPairReason(enum.Enum):
    NO_PREFILL = "no live prefill worker"  # -> UNAVAILABLE
    NO_DECODE = "no live decode worker"  # -> UNAVAILABLE
    TOO_LARGE = "larger than any live decode worker's KV cache"  # -> refuse now, never fits
    DECODE_FULL = "no decode worker has enough free KV blocks"  # -> wait, then RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Pair:
    prefill_id: str
    decode_id: str
    lease_blocks: int  # blocks the decode worker will lease for the prompt


@dataclass(frozen=True)
class NoPair:
    reason: NoPairReason
    detail: str  # for the status message


def prefill_cost(p: PrefillView, num_prompt_tokens: int, w: PolicyWeights) -> float:
    cached = min(p.prefix_overlap_blocks * p.block_size, num_prompt_tokens)
    return (p.queued_tokens + w.per_request_tokens * p.queue_depth
            + num_prompt_tokens - w.prefix_weight * cached)


def decode_score(d: DecodeView, num_prompt_tokens: int, w: PolicyWeights) -> float:
    headroom = (d.free_blocks - d.lease_blocks(num_prompt_tokens)) / d.total_blocks
    return w.headroom_weight * headroom - w.load_weight * (d.running + d.waiting) / d.max_num_seqs


def choose_pair(prefills: Sequence[PrefillView], decodes: Sequence[DecodeView],
                num_prompt_tokens: int, weights: PolicyWeights = PolicyWeights()) -> Pair | NoPair:
    """The pair for a request whose KV covers `num_prompt_tokens` (on a re-prefill: the prompt
    plus the tokens already streamed), or why there is none."""
    if num_prompt_tokens < 1:
        raise ValueError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
    live_prefills = [p for p in prefills if p.alive and not p.draining]
    if not live_prefills:
        return NoPair(NoPairReason.NO_PREFILL, f"{NoPairReason.NO_PREFILL.value} "
                      f"({len(prefills)} known, none alive and accepting)")
    decode = choose_decode(decodes, num_prompt_tokens, weights)
    if isinstance(decode, NoPair):
        return decode
    prefill = min(live_prefills,
                  key=lambda p: (prefill_cost(p, num_prompt_tokens, weights), p.worker_id))
    return Pair(prefill.worker_id, decode.worker_id, decode.lease_blocks(num_prompt_tokens))


def choose_decode(decodes: Sequence[DecodeView], num_prompt_tokens: int,
                  weights: PolicyWeights = PolicyWeights(), kind: str = "decode") -> DecodeView | NoPair:
    """The worker to hold a prompt's KV and decode it, or why there is none (`kind` names the
    pool in the reasons). It must be alive, not draining, able to hold the prompt plus one
    generated token at all (else TOO_LARGE: refused now) and have the prompt's blocks free now
    (else DECODE_FULL: wait). Among those the highest `decode_score` wins; ties go to the
    lowest worker_id."""
    live = [d for d in decodes if d.alive and not d.draining]
    if not live:
        return NoPair(NoPairReason.NO_DECODE, f"no live {kind} worker "
                      f"({len(decodes)} known, none alive and accepting)")
    # + 1: the first generated token needs a slot too (Engine.validate_prompt)
    can_hold = [d for d in live if d.lease_blocks(num_prompt_tokens + 1) <= d.total_blocks]
    if not can_hold:
        largest = max(d.total_blocks * d.block_size for d in live)
        return NoPair(NoPairReason.TOO_LARGE,
                      f"{num_prompt_tokens} prompt tokens are larger than any live {kind} "
                      f"worker's KV cache (the largest holds {largest} tokens)")
    with_room = [d for d in can_hold if d.free_blocks >= d.lease_blocks(num_prompt_tokens)]
    if not with_room:
        return NoPair(NoPairReason.DECODE_FULL, f"no {kind} worker has enough free KV blocks "
                      f"for {num_prompt_tokens} prompt tokens")
    return min(with_room, key=lambda d: (-decode_score(d, num_prompt_tokens, weights), d.worker_id))
