"""The hooks the workers stand on: a prefill-only engine exports KV per layer as it
computes it; a second engine imports that KV into its own blocks (another block
size) and decodes on. The tokens equal one engine doing the whole request."""
from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams

PROMPTS = ["The three primary colors are", "def fibonacci(n):\n    " * 4 + "return"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def handoff(prefill, decode, prompt_ids, params):
    """Prefill on one engine, import into the other; returns all generated token ids."""
    received = {}  # (layer) -> list of (start, end, kv)

    def sink(request_id, layer, start, end, kv):
        assert kv.shape == (2, end - start, 3, 64)
        received.setdefault(layer, []).append((start, end, kv))

    rid = prefill.add_request(prompt_ids, params, prefill_only=True, kv_sink=sink)
    first = None
    while prefill.has_unfinished:
        for out in prefill.step():
            if out.request_id == rid:
                first = out.new_token_ids[0] if out.new_token_ids else first
                assert out.finished == (out.finish_reason is not None)
    assert first is not None
    assert sorted(received) == list(range(prefill.model_config.num_layers))
    blocks = decode.reserve_blocks(len(prompt_ids))
    for layer, pieces in received.items():
        covered = 0
        for start, end, kv in pieces:
            assert start == covered  # contiguous, in order
            decode.kv.write_tokens(layer, blocks, start, kv)
            covered = end
        assert covered == len(prompt_ids)
    out = decode.add_prefilled_request(prompt_ids, first, blocks, params)
    tokens = list(out.new_token_ids)
    rid = out.request_id
    while decode.has_unfinished:
        for out in decode.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
    return tokens


def test_export_import_equals_one_engine(make_engine):
    whole = make_engine()
    prefill = make_engine(block_size=16, max_num_batched_tokens=24)  # chunked export
    decode = make_engine(block_size=8)
    free_before = decode.kv.pool.num_free
    for prompt in PROMPTS:
        ids = whole.tokenizer.encode(prompt)
        [expected] = whole.generate([ids], GREEDY)
        got = handoff(prefill, decode, ids, GREEDY)
        assert got == expected.token_ids
    assert decode.kv.pool.num_free == free_before
    assert prefill.kv.pool.num_used == 0


def test_export_includes_prefix_cached_tokens(make_engine):
    prefill = make_engine(block_size=16)
    decode = make_engine(block_size=16)
    ids = prefill.tokenizer.encode("A long shared system prompt. " * 10 + "Question one?")
    first = handoff(prefill, decode, ids, GREEDY)
    assert prefill.kv.pool.num_cached > 0
    second = handoff(prefill, decode, ids, GREEDY)  # served mostly from the prefix cache
    assert prefill.kv.pool.hits > 0
    assert first == second


def test_kv_written_equals_kv_read(make_engine):
    engine = make_engine(block_size=4)
    blocks = engine.reserve_blocks(10)
    kv = torch.randn(2, 7, 3, 64)
    engine.kv.write_tokens(5, blocks, 3, kv)
    assert torch.equal(engine.kv.read_tokens(5, blocks, 3, 10), kv)
    engine.release_blocks(blocks)
    assert engine.kv.pool.num_used == 0
