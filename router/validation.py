"""A GenerateRequest turned into what the engine takes, or refused with the field named.

Each error is an InvalidRequestError whose field is the proto field path ("sampling.top_p",
"messages[2].role", "prompt_token_ids[7]"), so the router maps it to INVALID_ARGUMENT with a
message a user can act on. Nothing else may escape `parse_generate_request` for any request.

The cheap checks (request id, prompt source, sampling) run before tokenizing, so a bad request
costs no tokenizer time. What depends on the cluster (a request id already in flight, a prompt
larger than every decode worker's KV pool, full queues) is the router's to check.

max_tokens: absent means `default_max_tokens`. Either way it is clipped to the context left
after the prompt (max_model_len - prompt tokens) rather than refused: the engine stops there
with LENGTH anyway, and the client sees finish_reason LENGTH. The prompt alone must leave room
for at least one generated token.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.tokenizer import ChatTemplateError, Tokenizer
from protos import pdserve_pb2 as pb

CHAT_ROLES = ("system", "user", "assistant")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str | None  # None: the router assigns one
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


def parse_generate_request(req: pb.GenerateRequest, *, tokenizer: Tokenizer, max_model_len: int,
                           vocab_size: int, default_max_tokens: int = 256,
                           max_request_id_len: int = 128, max_stop: int = 16,
                           max_stop_len: int = 256, max_prompt_chars: int = 1_000_000,
                           max_messages: int = 1024) -> ParsedRequest:
    """Validates every field of `req`; raises InvalidRequestError naming the first bad one."""
    request_id = _request_id(req.request_id, max_request_id_len)
    source = _prompt_source(req)
    params = _sampling_params(req.sampling, vocab_size=vocab_size,
                              default_max_tokens=default_max_tokens,
                              max_stop=max_stop, max_stop_len=max_stop_len)
    prompt = _prompt_token_ids(req, source, tokenizer, max_prompt_chars, max_messages)
    if not prompt:
        raise InvalidRequestError(source, "encodes to no tokens")
    if len(prompt) >= max_model_len:
        raise InvalidRequestError(
            source, f"has {len(prompt)} tokens; the model's context is {max_model_len} tokens "
            "including at least one generated token")
    # Tokenizer output is checked too: a tokenizer may know more ids than the model embeds.
    bad = next((i for i, t in enumerate(prompt) if t >= vocab_size), None)
    if bad is not None:
        field = f"prompt_token_ids[{bad}]" if source == "prompt_token_ids" else source
        raise InvalidRequestError(field, f"token id {prompt[bad]} is outside [0, {vocab_size})")
    room = max_model_len - len(prompt)
    if params.max_tokens > room:
        params = replace(params, max_tokens=room)
    return ParsedRequest(request_id, tuple(prompt), params)


def _show(text: str, limit: int = 40) -> str:
    """repr of user input, cut short so an error message never echoes megabytes."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _request_id(request_id: str, max_len: int) -> str | None:
    if not request_id:
        return None
    if len(request_id) > max_len:
        raise InvalidRequestError(
            "request_id", f"is {len(request_id)} characters, at most {max_len} allowed")
    # printable ASCII without spaces: ids end up in logs, metrics labels and Ray task names
    bad = next((c for c in request_id if not "!" <= c <= "~"), None)
    if bad is not None:
        raise InvalidRequestError(
            "request_id", f"may hold only printable ASCII characters without spaces, found {bad!r}")
    return request_id


def _prompt_source(req: pb.GenerateRequest) -> str:
    # An explicitly set empty prompt counts as set (and is refused as empty below); empty
    # repeated fields are indistinguishable from absent ones on the wire.
    given = [name for name, present in (("prompt", req.HasField("prompt")),
                                        ("prompt_token_ids", len(req.prompt_token_ids) > 0),
                                        ("messages", len(req.messages) > 0)) if present]
    if len(given) != 1:
        raise InvalidRequestError(
            "prompt", "set exactly one of prompt, prompt_token_ids, messages; got "
            + (", ".join(given) if given else "none (or an empty list)"))
    return given[0]


def _sampling_params(s: pb.SamplingParams, *, vocab_size: int, default_max_tokens: int,
                     max_stop: int, max_stop_len: int) -> SamplingParams:
    for name in _FLOAT_FIELDS:
        value = getattr(s, name)
        if not math.isfinite(value):
            raise InvalidRequestError(f"sampling.{name}", f"must be a finite number, got {value}")
    for name, values in (("stop", s.stop), ("stop_token_ids", s.stop_token_ids)):
        if len(values) > max_stop:
            raise InvalidRequestError(
                f"sampling.{name}", f"has {len(values)} entries, at most {max_stop} allowed")
    for i, stop in enumerate(s.stop):
        if not stop:
            raise InvalidRequestError(f"sampling.stop[{i}]", "must be non-empty")
        if len(stop) > max_stop_len:
            raise InvalidRequestError(
                f"sampling.stop[{i}]", f"is {len(stop)} characters, at most {max_stop_len} allowed")
    for i, token_id in enumerate(s.stop_token_ids):
        if token_id >= vocab_size:
            raise InvalidRequestError(f"sampling.stop_token_ids[{i}]",
                                      f"token id {token_id} is outside [0, {vocab_size})")

    def given(name: str, default: float | int | None) -> float | int | None:
        return getattr(s, name) if s.HasField(name) else default

    try:  # SamplingParams checks the ranges; only the field path is ours to add
        return SamplingParams(
            max_tokens=given("max_tokens", default_max_tokens),
            temperature=given("temperature", 1.0), top_p=given("top_p", 1.0), top_k=s.top_k,
            min_p=s.min_p, seed=given("seed", None),
            repetition_penalty=given("repetition_penalty", 1.0),
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
            logprobs=given("logprobs", None),
            include_stop_str_in_output=s.include_stop_str_in_output)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"sampling.{e.field}", e.problem) from None


def _prompt_token_ids(req: pb.GenerateRequest, source: str, tokenizer: Tokenizer,
                      max_prompt_chars: int, max_messages: int) -> list[int]:
    if source == "prompt_token_ids":
        return list(req.prompt_token_ids)
    if source == "prompt":
        if not req.prompt:
            raise InvalidRequestError("prompt", "is empty")
        if len(req.prompt) > max_prompt_chars:
            raise InvalidRequestError(
                "prompt", f"is {len(req.prompt)} characters, at most {max_prompt_chars} allowed")
        return tokenizer.encode(req.prompt)
    return tokenizer.encode(_render_chat(req.messages, tokenizer, max_prompt_chars, max_messages))


def _render_chat(messages: Sequence[pb.ChatMessage], tokenizer: Tokenizer, max_prompt_chars: int,
                 max_messages: int) -> str:
    if len(messages) > max_messages:
        raise InvalidRequestError(
            "messages", f"has {len(messages)} messages, at most {max_messages} allowed")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role",
                                      f"must be one of {', '.join(CHAT_ROLES)}, got {_show(m.role)}")
    chars = sum(len(m.content) for m in messages)
    if chars > max_prompt_chars:
        raise InvalidRequestError(
            "messages", f"hold {chars} characters of content, at most {max_prompt_chars} allowed")
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True)
    except ChatTemplateError as e:
        raise InvalidRequestError("messages", str(e)) from None
