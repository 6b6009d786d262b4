"""A request inside the engine: its tokens, its two counters, its blocks.

There is no prefill or decode phase: each step computes tokens
[num_computed_tokens, num_tokens) (or a budgeted chunk of them), and when a step
reaches num_tokens the request samples its next token.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.sampler import SamplingState
from engine.sampling_params import SamplingParams

# Called per layer as a prefill runs: (request_id, layer, token_start, token_end,
# kv [2, token_end - token_start, kv_heads, head_dim]); the tensor is the caller's to keep.
KVSink = Callable[[str, int, int, int, torch.Tensor], None]


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller
    PREFILLED = "prefilled"  # a prefill-only request produced its first token


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    arrival_time: float = field(default_factory=time.monotonic)
    prefill_only: bool = False  # stop after the first token (the prefill pool)
    kv_sink: KVSink | None = None  # receives the KV per layer as it is computed
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, chained
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    num_exported_tokens: int = 0  # tokens already handed to kv_sink
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.sampling.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.sampling.output_token_ids.append(token_id)

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
