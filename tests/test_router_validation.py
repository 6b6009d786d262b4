"""router.validation: GenerateRequest -> (prompt ids, SamplingParams), or InvalidRequestError
naming the proto field; and router.responses: engine outputs -> GenerateResponse."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.output_processor import RequestOutput
from engine.request import FinishReason
from engine.sampler import TokenLogprobs
from engine.sampling_params import InvalidRequestError
from protos import pdserve_pb2 as pb
from router.responses import build_response, response_from_output, to_response_finish_reason
from router.validation import ParsedRequest, parse_generate_request

MAX_LEN = 64  # a small context so "over context" requests stay small


@pytest.fixture(scope="module")
def tok(model_dir):
    from engine.loader import load_tokenizer
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def vocab(model_dir):
    from engine.loader import load_model_config
    return load_model_config(model_dir).vocab_size


@pytest.fixture(scope="module")
def parse(tok, vocab):
    def run(req: pb.GenerateRequest, **kw) -> ParsedRequest:
        kw.setdefault("max_model_len", MAX_LEN)
        return parse_generate_request(req, tokenizer=tok, vocab_size=vocab, **kw)
    return run


def refused(parse, req: pb.GenerateRequest, **kw) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse(req, **kw)
    return info.value


# ---------------------------------------------------------------- accepted requests

def test_prompt_is_tokenized_and_absent_fields_take_defaults(parse, tok):
    got = parse(pb.GenerateRequest(prompt="The sky is"), default_max_tokens=7)
    assert got.prompt_token_ids == tuple(tok.encode("The sky is"))
    assert got.request_id is None
    p = got.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.logprobs) == (7, 1.0, 1.0, 0, None, None)
    assert p.repetition_penalty == 1.0 and p.stop == () and not p.ignore_eos


def test_every_sampling_field_reaches_the_engine_params(parse):
    s = pb.SamplingParams(max_tokens=5, temperature=0.0, top_p=0.5, top_k=7, min_p=0.25, seed=-3,
                          repetition_penalty=1.5, presence_penalty=-0.5, frequency_penalty=0.75,
                          stop=["\n\n", "END"], stop_token_ids=[2, 7], ignore_eos=True, logprobs=0,
                          include_stop_str_in_output=True)
    p = parse(pb.GenerateRequest(request_id="a-1", prompt_token_ids=[1, 2, 3], sampling=s)).params
    assert p.greedy  # an explicit 0 is greedy; an absent temperature is 1.0 (above)
    assert (p.max_tokens, p.top_p, p.top_k, p.min_p, p.seed) == (5, 0.5, 7, 0.25, -3)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.5, -0.5, 0.75)
    assert p.stop == ("\n\n", "END") and p.stop_token_ids == (2, 7)
    assert p.ignore_eos and p.logprobs == 0 and p.include_stop_str_in_output


def test_token_ids_and_request_id_pass_through(parse):
    got = parse(pb.GenerateRequest(request_id="Req_42:x", prompt_token_ids=[5, 0, 49151]))
    assert got == ParsedRequest("Req_42:x", (5, 0, 49151), got.params)


def test_messages_render_with_the_chat_template(parse, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    got = parse(pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in msgs]), max_model_len=4096)
    assert got.prompt_token_ids == tuple(tok.encode(tok.apply_chat_template(msgs)))
    assert "Hi!" in tok.decode(got.prompt_token_ids)


@pytest.mark.parametrize("asked, prompt_len, expected", [
    (None, 10, 54),  # default 256 clipped to MAX_LEN - 10
    (100, 10, 54),  # clipped
    (54, 10, 54),  # fits exactly
    (3, 10, 3),
    (None, 63, 1),  # the longest prompt allowed leaves one token
])
def test_max_tokens_is_clipped_to_the_context_left(parse, asked, prompt_len, expected):
    s = pb.SamplingParams() if asked is None else pb.SamplingParams(max_tokens=asked)
    got = parse(pb.GenerateRequest(prompt_token_ids=[1] * prompt_len, sampling=s))
    assert got.params.max_tokens == expected


# ---------------------------------------------------------------- refused requests, by hand

def S(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)


BAD = [
    # (request, field, words in the problem)
    (pb.GenerateRequest(prompt=""), "prompt", "is empty"),
    (pb.GenerateRequest(), "prompt", "got none"),
    (pb.GenerateRequest(prompt="x", prompt_token_ids=[1]), "prompt", "got prompt, prompt_token_ids"),
    (pb.GenerateRequest(prompt_token_ids=[1] * MAX_LEN), "prompt_token_ids", f"has {MAX_LEN} tokens"),
    (pb.GenerateRequest(prompt="hello " * 200), "prompt", "context is 64 tokens"),
    (pb.GenerateRequest(prompt_token_ids=[1, 49152]), "prompt_token_ids[1]", "token id 49152"),
    (pb.GenerateRequest(prompt="x", sampling=S(max_tokens=0)), "sampling.max_tokens", "got 0"),
    (pb.GenerateRequest(prompt="x", sampling=S(max_tokens=-5)), "sampling.max_tokens", ">= 1"),
    (pb.GenerateRequest(prompt="x", sampling=S(temperature=-0.1)), "sampling.temperature", ">= 0"),
    (pb.GenerateRequest(prompt="x", sampling=S(temperature=math.nan)), "sampling.temperature", "finite"),
    (pb.GenerateRequest(prompt="x", sampling=S(temperature=math.inf)), "sampling.temperature", "finite"),
    (pb.GenerateRequest(prompt="x", sampling=S(top_p=0.0)), "sampling.top_p", "must be in (0, 1], got 0.0"),
    (pb.GenerateRequest(prompt="x", sampling=S(top_p=1.5)), "sampling.top_p", "got 1.5"),
    (pb.GenerateRequest(prompt="x", sampling=S(top_k=-2)), "sampling.top_k", "got -2"),
    (pb.GenerateRequest(prompt="x", sampling=S(min_p=-math.inf)), "sampling.min_p", "finite"),
    (pb.GenerateRequest(prompt="x", sampling=S(repetition_penalty=0)), "sampling.repetition_penalty", "> 0"),
    (pb.GenerateRequest(prompt="x", sampling=S(presence_penalty=2.5)), "sampling.presence_penalty", "[-2, 2]"),
    (pb.GenerateRequest(prompt="x", sampling=S(frequency_penalty=math.nan)), "sampling.frequency_penalty", "finite"),
    (pb.GenerateRequest(prompt="x", sampling=S(logprobs=21)), "sampling.logprobs", "[0, 20]"),
    (pb.GenerateRequest(prompt="x", sampling=S(stop=["a", ""])), "sampling.stop[1]", "non-empty"),
    (pb.GenerateRequest(prompt="x", sampling=S(stop=["a"] * 17)), "sampling.stop", "at most 16"),
    (pb.GenerateRequest(prompt="x", sampling=S(stop=["a" * 257])), "sampling.stop[0]", "at most 256"),
    (pb.GenerateRequest(prompt="x", sampling=S(stop_token_ids=[3, 10**6])), "sampling.stop_token_ids[1]", "outside"),
    (pb.GenerateRequest(prompt="x", request_id="a" * 129), "request_id", "at most 128"),
    (pb.GenerateRequest(prompt="x", request_id="has space"), "request_id", "' '"),
    (pb.GenerateRequest(prompt="x", request_id="é"), "request_id", "printable ASCII"),
    (pb.GenerateRequest(prompt="x", request_id="a\nb"), "request_id", "'\\n'"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi"),
                                  pb.ChatMessage(role="tool", content="x")]), "messages[1].role", "'tool'"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(content="hi")]), "messages[0].role", "got ''"),
]


@pytest.mark.parametrize("req, field, words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_request_is_refused_naming_the_field(parse, req, field, words):
    err = refused(parse, req)
    assert err.field == field
    assert words in err.problem, err.problem


def test_size_limits_are_the_callers(parse):
    assert refused(parse, pb.GenerateRequest(prompt="abcdef"), max_prompt_chars=5).field == "prompt"
    msgs = [pb.ChatMessage(role="user", content="abc")] * 3
    assert "at most 2 allowed" in refused(parse, pb.GenerateRequest(messages=msgs), max_messages=2).problem
    assert "at most 8 allowed" in refused(parse, pb.GenerateRequest(messages=msgs), max_prompt_chars=8).problem
    assert refused(parse, pb.GenerateRequest(prompt="x", request_id="abcd"), max_request_id_len=3).field == "request_id"
    assert parse(pb.GenerateRequest(prompt="x", request_id="abc"), max_request_id_len=3).request_id == "abc"


def test_a_model_without_chat_template_refuses_messages(model_dir, vocab):
    from engine.loader import load_tokenizer
    tok = load_tokenizer(model_dir)
    tok.chat_template = None
    err = refused(lambda r, **kw: parse_generate_request(r, tokenizer=tok, vocab_size=vocab, max_model_len=64, **kw),
                  pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]))
    assert err.field == "messages" and "no chat template" in err.problem


# ---------------------------------------------------------------- refused requests, generated

_floats_out = st.sampled_from([math.nan, math.inf, -math.inf])
# each: (field named in the error, strategy for a GenerateRequest broken in that field only)
_BREAKERS = {
    "prompt": st.just(pb.GenerateRequest(prompt="")) | st.builds(
        lambda ids: pb.GenerateRequest(prompt="x", prompt_token_ids=ids),
        st.lists(st.integers(0, 100), min_size=1, max_size=3)),
    "prompt_token_ids": st.lists(st.integers(0, 49151), min_size=MAX_LEN, max_size=MAX_LEN + 5).map(
        lambda ids: pb.GenerateRequest(prompt_token_ids=ids)) | st.builds(
        lambda ids, bad, at: pb.GenerateRequest(prompt_token_ids=ids[:at] + [bad] + ids[at:]),
        st.lists(st.integers(0, 49151), max_size=10), st.integers(49152, 2**32 - 1), st.integers(0, 10)),
    "request_id": st.text(min_size=129, max_size=300, alphabet="abc").map(
        lambda rid: pb.GenerateRequest(prompt="x", request_id=rid)) | st.text(min_size=1, max_size=20).filter(
        lambda rid: any(not "!" <= c <= "~" for c in rid)).map(lambda rid: pb.GenerateRequest(prompt="x", request_id=rid)),
    "messages": st.text(max_size=12).filter(lambda r: r not in ("system", "user", "assistant")).map(
        lambda role: pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="a"),
                                                  pb.ChatMessage(role=role, content="b")])),
    "sampling.max_tokens": st.integers(-2**31, 0).map(lambda n: S(max_tokens=n)),
    "sampling.temperature": (st.floats(max_value=-1e-300) | _floats_out).map(lambda v: S(temperature=v)),
    "sampling.top_p": (st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True) | _floats_out).map(
        lambda v: S(top_p=v)),
    "sampling.top_k": st.integers(-2**31, -2).map(lambda k: S(top_k=k)),
    "sampling.min_p": (st.floats(max_value=-1e-300) | st.floats(min_value=1.0, exclude_min=True)).map(
        lambda v: S(min_p=v)),
    "sampling.repetition_penalty": (st.floats(max_value=0.0) | _floats_out).map(
        lambda v: S(repetition_penalty=v)),
    "sampling.presence_penalty": (st.floats(min_value=2.0, exclude_min=True) | _floats_out).map(
        lambda v: S(presence_penalty=v)),
    "sampling.frequency_penalty": st.floats(max_value=-2.0, exclude_max=True).map(lambda v: S(frequency_penalty=v)),
    "sampling.logprobs": (st.integers(-2**31, -1) | st.integers(21, 2**31 - 1)).map(lambda n: S(logprobs=n)),
    "sampling.stop": st.lists(st.text(min_size=1, max_size=3), min_size=17, max_size=40).map(lambda s: S(stop=s))
    | st.lists(st.text(min_size=1, max_size=3), max_size=5).map(lambda s: S(stop=s + [""]))
    | st.text(min_size=257, max_size=400).map(lambda s: S(stop=[s])),
    "sampling.stop_token_ids": st.lists(st.integers(0, 100), min_size=17, max_size=40).map(
        lambda ids: S(stop_token_ids=ids)) | st.integers(49152, 2**32 - 1).map(lambda t: S(stop_token_ids=[t])),
}


def _as_request(field: str, broken) -> pb.GenerateRequest:
    # a sampling breaker yields SamplingParams: put it in an otherwise valid request
    return pb.GenerateRequest(prompt="Hello", sampling=broken) if isinstance(broken, pb.SamplingParams) else broken


_MALFORMED = st.sampled_from(sorted(_BREAKERS)).flatmap(
    lambda field: _BREAKERS[field].map(lambda broken: (field, _as_request(field, broken))))


def test_generated_malformed_requests_are_all_refused_naming_the_field(parse):
    seen: list[str] = []

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(_MALFORMED)
    def check(case: tuple[str, pb.GenerateRequest]) -> None:
        field, req = case
        err = refused(parse, req)  # fails on any other exception, or on none
        assert err.field == field or err.field.startswith((field + "[", field + ".")), (field, err)
        seen.append(field)

    check()
    assert len(seen) >= 100 and set(seen) == set(_BREAKERS), (len(seen), set(_BREAKERS) - set(seen))


_ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
_ANY_SAMPLING = st.builds(
    pb.SamplingParams, max_tokens=st.integers(-2**31, 2**31 - 1), temperature=_ANY_FLOAT, top_p=_ANY_FLOAT,
    top_k=st.integers(-2**31, 2**31 - 1), min_p=_ANY_FLOAT, seed=st.integers(-2**63, 2**63 - 1),
    repetition_penalty=_ANY_FLOAT, presence_penalty=_ANY_FLOAT, frequency_penalty=_ANY_FLOAT,
    stop=st.lists(st.text(max_size=5), max_size=20), stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=20),
    ignore_eos=st.booleans(), logprobs=st.integers(-2**31, 2**31 - 1))
_ANY_REQUEST = st.builds(
    pb.GenerateRequest, request_id=st.text(max_size=140), prompt=st.none() | st.text(max_size=300),
    prompt_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=80),
    messages=st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "x", ""]),
                                content=st.text(max_size=50)), max_size=3),
    sampling=st.none() | _ANY_SAMPLING)


@settings(max_examples=300, deadline=None, database=None)
@given(_ANY_REQUEST)
def test_any_request_parses_or_is_refused_and_nothing_else(parse, vocab, req):
    try:
        got = parse(req)
    except InvalidRequestError:
        return
    assert 0 < len(got.prompt_token_ids) < MAX_LEN
    assert all(t < vocab for t in got.prompt_token_ids)
    assert 1 <= got.params.max_tokens <= MAX_LEN - len(got.prompt_token_ids)


# ---------------------------------------------------------------- responses

@pytest.mark.parametrize("reason, expected", [
    (None, pb.FINISH_REASON_UNSPECIFIED), (FinishReason.STOP, pb.FINISH_REASON_STOP),
    (FinishReason.LENGTH, pb.FINISH_REASON_LENGTH), (FinishReason.ABORT, pb.FINISH_REASON_CANCELLED)])
def test_finish_reasons_map_to_the_api(reason, expected):
    assert to_response_finish_reason(reason) == expected


def test_prefilled_is_internal_and_never_sent():
    with pytest.raises(ValueError, match="prefilled"):
        to_response_finish_reason(FinishReason.PREFILLED)


def test_a_mid_stream_message_has_ids_text_and_logprobs_but_no_usage(tok):
    lp = TokenLogprobs(token_id=504, logprob=-0.25, top=[(504, -0.25), (9, -2.0)])
    out = RequestOutput("r1", [504], " the", logprobs=[lp], num_prompt_tokens=5, num_output_tokens=1)
    msg = pb.GenerateResponse.FromString(response_from_output(out, tokenizer=tok).SerializeToString())
    assert (msg.request_id, list(msg.token_ids), msg.text) == ("r1", [504], " the")
    assert msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED and msg.WhichOneof("stop_reason") is None
    assert not msg.HasField("usage") and not msg.HasField("timing")
    [entry] = msg.logprobs
    assert (entry.token_id, entry.logprob, entry.token) == (504, -0.25, tok.decode([504], skip_special_tokens=False))
    assert [(t.token_id, t.logprob) for t in entry.top] == [(504, -0.25), (9, -2.0)]


def test_the_last_message_has_reason_stop_usage_and_timing():
    out = RequestOutput("r1", [2], "", finished=True, finish_reason=FinishReason.STOP, stop_reason=2,
                        num_prompt_tokens=12, num_output_tokens=7, num_cached_tokens=8)
    msg = response_from_output(out, request_id="client-id", timing=pb.Timing(queue_s=0.5, ttft_s=1.0, e2e_s=3.0))
    assert msg.request_id == "client-id" and msg.finish_reason == pb.FINISH_REASON_STOP
    assert msg.WhichOneof("stop_reason") == "stop_token_id" and msg.stop_token_id == 2
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_prompt_tokens) == (12, 7, 8)
    assert (msg.timing.queue_s, msg.timing.ttft_s, msg.timing.e2e_s) == (0.5, 1.0, 3.0)
    assert len(msg.logprobs) == 0


def test_a_stop_string_and_a_cancel():
    msg = build_response("r", [11], "x", FinishReason.STOP, stop_reason="END", num_output_tokens=1)
    assert msg.WhichOneof("stop_reason") == "stop_str" and msg.stop_str == "END"
    msg = build_response("r", [], "", FinishReason.ABORT, num_prompt_tokens=3, num_output_tokens=0)
    assert msg.finish_reason == pb.FINISH_REASON_CANCELLED and msg.usage.prompt_tokens == 3
    assert msg.HasField("usage")  # even with zero completion tokens the last message carries usage
