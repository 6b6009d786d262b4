"""GenerateResponse messages built from what the engine reports for a request.

The engine's outputs are deltas (the new ids and text of one step); each becomes one message.
Usage goes on the last message (the one with a finish reason), timing where the router passes
it (also the last message), so a streamed token costs only its ids, text and logprobs.
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.output_processor import RequestOutput
from engine.request import FinishReason
from engine.sampler import TokenLogprobs
from engine.tokenizer import Tokenizer
from protos import pdserve_pb2 as pb

_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_CANCELLED,
}


def to_response_finish_reason(reason: FinishReason | None) -> pb.FinishReason:
    """The API's finish reason; None (not finished) is UNSPECIFIED. PREFILLED is the prefill
    pool's internal hand-off and never reaches a client, so it raises ValueError."""
    if reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    if reason not in _FINISH_REASONS:
        raise ValueError(f"finish reason {reason.value!r} is internal to the workers")
    return _FINISH_REASONS[reason]


def build_response(request_id: str, new_token_ids: Sequence[int], new_text: str,
                   finish_reason: FinishReason | None, *, stop_reason: str | int | None = None,
                   logprobs: Sequence[TokenLogprobs | None] = (), num_prompt_tokens: int = 0,
                   num_output_tokens: int = 0, num_cached_tokens: int = 0,
                   timing: pb.Timing | None = None,
                   tokenizer: Tokenizer | None = None) -> pb.GenerateResponse:
    """One stream message. With `tokenizer`, each logprob carries its token's text."""
    msg = pb.GenerateResponse(request_id=request_id, token_ids=list(new_token_ids),
                              text=new_text,
                              finish_reason=to_response_finish_reason(finish_reason))
    if isinstance(stop_reason, str):
        msg.stop_str = stop_reason
    elif isinstance(stop_reason, int):
        msg.stop_token_id = stop_reason
    for lp in logprobs:
        if lp is None:  # the request did not ask for logprobs
            continue
        entry = msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob,
                                 token=_token_text(tokenizer, lp.token_id))
        for token_id, logprob in lp.top:
            entry.top.add(token_id=token_id, logprob=logprob,
                          token=_token_text(tokenizer, token_id))
    if finish_reason is not None:
        msg.usage.prompt_tokens = num_prompt_tokens
        msg.usage.completion_tokens = num_output_tokens
        msg.usage.cached_prompt_tokens = num_cached_tokens
    if timing is not None:
        msg.timing.CopyFrom(timing)
    return msg


def response_from_output(out: RequestOutput, *, request_id: str | None = None,
                         timing: pb.Timing | None = None,
                         tokenizer: Tokenizer | None = None) -> pb.GenerateResponse:
    """`build_response` from an engine RequestOutput; `request_id` overrides the engine's id
    (the router may run a request under an internal id, e.g. after a re-prefill)."""
    return build_response(
        request_id if request_id is not None else out.request_id, out.new_token_ids,
        out.new_text, out.finish_reason, stop_reason=out.stop_reason, logprobs=out.logprobs,
        num_prompt_tokens=out.num_prompt_tokens, num_output_tokens=out.num_output_tokens,
        num_cached_tokens=out.num_cached_tokens, timing=timing, tokenizer=tokenizer)


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    # a byte-level token alone may be part of a character; decode shows U+FFFD for it, like vLLM
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""
