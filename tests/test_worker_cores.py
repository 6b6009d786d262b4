"""Prefill core -> fake link -> decode core, on real engines: the same tokens as one engine."""
from __future__ import annotations

import queue

import pytest

from decode_worker.core import DecodeCore
from engine.config import CacheConfig, EngineConfig
from engine.sampling_params import SamplingParams
from kv_transfer.base import TransferError
from kv_transfer.fake import FakeLink, FakeListener, FakeNetwork
from prefill_worker.core import PrefillCore

PROMPTS = ["The first law of thermodynamics says", "List three fruits:", "Hello! " * 20 + "Bye"]


@pytest.fixture(scope="module")
def pair(model_dir):
    net = FakeNetwork()
    cfg = lambda bs: EngineConfig(model=str(model_dir), cache=CacheConfig(bs, 128))  # noqa: E731
    decode = DecodeCore(cfg(8), lambda h, p, e: FakeListener(h, p, e, network=net))
    prefill = PrefillCore(cfg(16), FakeLink(network=net))
    yield prefill, decode
    prefill.close()
    decode.close()


def run(prefill, decode, rid, prompt_ids, params):
    lease = decode.reserve(rid, len(prompt_ids))
    outputs: queue.Queue = queue.Queue()
    fut = prefill.submit(rid, prompt_ids, params, lease)
    first = fut.result(60)
    decode.start(rid, prompt_ids, params, outputs.put, timeout_s=30)
    tokens = []
    while True:
        out = outputs.get(timeout=60)
        tokens += out.new_token_ids
        if out.finished:
            return first, tokens, out


def test_disaggregated_equals_colocated(pair, make_engine):
    prefill, decode = pair
    colocated = make_engine()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    free0 = decode.engine.kv.pool.num_free
    for i, prompt in enumerate(PROMPTS):
        ids = colocated.tokenizer.encode(prompt)
        [want] = colocated.generate([ids], params)
        first, tokens, last = run(prefill, decode, f"r{i}", ids, params)
        assert tokens == want.token_ids and first == want.token_ids[0]
        assert last.finish_reason.value == "length"
    assert decode.engine.kv.pool.num_free == free0
    assert decode.stats().transfers_ready == len(PROMPTS)


def test_seeded_sampling_continues_across_the_handoff(pair, make_engine):
    prefill, decode = pair
    colocated = make_engine()
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    ids = colocated.tokenizer.encode("Write a word:")
    [want] = colocated.generate([ids], params)
    _, tokens, _ = run(prefill, decode, "seeded", ids, params)
    assert tokens == want.token_ids


def test_decode_cancel_frees_everything(pair):
    prefill, decode = pair
    free0 = decode.engine.kv.pool.num_free
    lease = decode.reserve("c1", 40)
    assert decode.engine.kv.pool.num_free < free0
    assert decode.cancel("c1")
    assert decode.engine.kv.pool.num_free == free0
    # the prefill side now sees a refusal
    fut = prefill.submit("c1", list(range(1, 41)), SamplingParams(max_tokens=4), lease)
    with pytest.raises(TransferError, match="no live lease"):
        fut.result(60)


def test_start_times_out_and_frees_when_no_kv_arrives(pair):
    _, decode = pair
    free0 = decode.engine.kv.pool.num_free
    decode.reserve("never", 10)
    with pytest.raises(TransferError, match="did not arrive"):
        decode.start("never", list(range(1, 11)), SamplingParams(), lambda o: None, timeout_s=0.2)
    assert decode.engine.kv.pool.num_free == free0
