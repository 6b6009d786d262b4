"""After sampling: append the token, detokenize it, and decide whether the request stops."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.request import FinishReason, Request
from engine.sampler import TokenLogprobs
from engine.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta; `finished` on the last one)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that matched
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def add(self, req: Request) -> None:
        self._detok[req.request_id] = IncrementalDetokenizer(
            self.tokenizer.backend, req.params, prompt_token_ids=req.prompt_token_ids)

    def remove(self, request_id: str) -> None:
        self._detok.pop(request_id, None)

    def append_token(self, req: Request, token_id: int,
                     logprobs: TokenLogprobs | None) -> tuple[RequestOutput, FinishReason | None]:
        """Adds the sampled token to `req`; returns its output and the reason to finish, if any."""
        params = req.params
        req.append_output(token_id)
        detok = self._detok[req.request_id]
        text, reason, stop_reason = "", None, None
        if token_id in params.stop_token_ids or (
                not params.ignore_eos and token_id in self.eos_token_ids):
            reason, stop_reason = FinishReason.STOP, token_id
        else:
            text = detok.push(token_id)
            if detok.stop_reason is not None:
                reason, stop_reason = FinishReason.STOP, detok.stop_reason
        if reason is None and (len(req.output_token_ids) >= params.max_tokens
                               or req.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is None and req.prefill_only:
            reason = FinishReason.PREFILLED
        if reason is not None and detok.stop_reason is None:
            text += detok.flush()
        out = RequestOutput(req.request_id, [token_id], text, reason is not None, reason,
                            stop_reason, [logprobs] if params.logprobs is not None else [],
                            req.num_prompt_tokens, len(req.output_token_ids),
                            req.num_prefix_hit_tokens)
        return out, reason

    def finished_output(self, req: Request) -> RequestOutput:
        """The closing output of a request finished without a new token (abort, no room)."""
        return RequestOutput(req.request_id, [], "", True, req.finish_reason, None, [],
                             req.num_prompt_tokens, len(req.output_token_ids),
                             req.num_prefix_hit_tokens)
