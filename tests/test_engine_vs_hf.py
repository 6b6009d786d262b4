"""Greedy output of the engine equals Hugging Face transformers, token for token.

The prompts are of different lengths and run as one mixed batch; the batch is run
with prefix caching on and off, with chunked prefill forced by a small token
budget, and with preemption forced by a small KV pool.
"""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams

MAX_NEW = 20
PROMPTS = [
    "Hi",
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about paged attention.<|im_end|>\n<|im_start|>assistant\n",
    # two prompts that share a long prefix, so the prefix cache has something to reuse
    "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 3
    + "told stories about",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 3
    + "never caught",
    " ".join(str(i) for i in range(60)),
]


@pytest.fixture(scope="module")
def expected(model_dir):
    """HF transformers' greedy continuations (batch 1 each, no padding effects)."""
    transformers = pytest.importorskip("transformers")
    from engine.loader import load_tokenizer
    tok = load_tokenizer(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    prompts = [tok.encode(p) for p in PROMPTS]
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 min_new_tokens=MAX_NEW, pad_token_id=tok.eos_token_ids[0])
            outs.append(gen[0, len(ids):].tolist())
    return prompts, outs


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("settings", [
    dict(),
    dict(prefix_caching=False),
    dict(max_num_batched_tokens=32),  # chunked prefill: the long prompts take several steps
    dict(block_size=4, prefix_caching=False, num_blocks=None),  # preemption, sized below
], ids=["default", "no-prefix-cache", "chunked", "preempt"])
def test_greedy_matches_hf(make_engine, expected, settings):
    prompts, want = expected
    if settings.get("num_blocks", 0) is None:
        # Room for every prompt plus a block each, not for 20 more tokens each: the
        # batch is admitted whole, then must preempt as it grows.
        settings = dict(settings, num_blocks=sum(-(-len(p) // 4) + 1 for p in prompts))
    engine = make_engine(**settings)
    # run the batch twice: the second pass reuses the prefix cache when it is on
    for _ in range(2):
        got = engine.generate(prompts, GREEDY)
        for i, completion in enumerate(got):
            assert completion.token_ids == want[i], f"prompt {i} diverged"
    assert engine.kv.pool.num_used == 0  # every block returned
    if settings.get("block_size") == 4:
        assert engine.stats.num_preemptions > 0, "the small pool should have forced preemption"
    if settings.get("max_num_batched_tokens") == 32:
        assert engine.stats.max_step_tokens <= 32
    if settings.get("prefix_caching", True):
        assert engine.kv.pool.hits > 0


def test_short_chunks_as_kernel_rows_next_to_sdpa_chunks(make_engine, expected, monkeypatch):
    """With the limit lowered to 20 tokens, the short prompts' tokens are attended as one-query
    rows of the paged kernel and the longer ones by SDPA, in the same steps."""
    from engine import model_runner

    monkeypatch.setattr(model_runner, "KERNEL_PREFILL_MAX_CONTEXT", 20)
    prompts, want = expected
    engine = make_engine(prefix_caching=False)
    if not engine.runner.decode_kernel:
        pytest.skip("the CPU attention kernel is not built here")
    layouts = []
    prepare = engine.runner.prepare

    def spy(scheduled):
        inputs = prepare(scheduled)
        decodes = sum(item.num_new_tokens == 1 for item in scheduled)
        layouts.append((inputs.meta.num_decode - decodes, len(inputs.meta.prefills)))
        return inputs

    monkeypatch.setattr(engine.runner, "prepare", spy)
    got = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == want
    # the first step: short prompts' tokens as kernel rows, the long prompts as SDPA chunks
    short_tokens = sum(len(p) for p in prompts if 1 < len(p) <= 20)  # 1 token: a decode row
    assert layouts[0] == (short_tokens, sum(len(p) > 20 for p in prompts))
    assert short_tokens > 0 and layouts[0][1] > 0


@pytest.mark.parametrize("math", ["ieee", "bf16x3", "bf16x6"])
def test_every_fp32_matmul_matches_hf(make_engine, expected, monkeypatch, math):
    """The packed linears' float32 maths (PDSERVE_FP32_MATMUL): the FMA kernel, and the AMX
    kernel with two or three bf16 parts where the CPU has AMX."""
    from engine.kernels import cpu_ops

    if math != "ieee" and not cpu_ops.amx_available():
        pytest.skip("no AMX on this CPU (or in this kernel build)")
    monkeypatch.setenv("PDSERVE_FP32_MATMUL", math)
    prompts, want = expected
    engine = make_engine()
    if engine.model.lm_head.packed is None:
        pytest.skip("the CPU kernels are not built here")
    assert {lin.math for layer in engine.model.layers
            for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)} == {math}
    got = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == want


def test_torch_only_engine_matches_hf(make_engine, expected, monkeypatch):
    """With every C++ kernel and the weight packing switched off (torch ops only, the path
    CUDA and a machine without a compiler take) the tokens are the same."""
    monkeypatch.setenv("PDSERVE_ATTENTION", "sdpa")
    monkeypatch.setenv("PDSERVE_LINEAR", "torch")
    prompts, want = expected
    engine = make_engine()
    assert not engine.model.fused and not engine.runner.decode_kernel
    assert engine.model.lm_head.packed is None
    got = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == want


def test_bfloat16_engine_starts_like_hf(model_dir, expected):
    """bfloat16 weights and KV (torch ops; the kernels are float32) keep the first greedy
    tokens of a short prompt."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    prompts, want = expected
    engine = Engine(EngineConfig(model=str(model_dir), dtype="bfloat16", device="cpu"))
    assert engine.model.embed.dtype == torch.bfloat16 and not engine.model.fused
    got = engine.generate([prompts[1]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert got[0].token_ids == want[1][:4]


def test_a_request_gets_the_same_logits_bits_alone_and_in_a_batch(make_engine, expected):
    """On CPU with the kernels every op computes a row independently of the other rows of its
    step (the packed linear, the paged attention for decode rows and short prefill chunks, the
    fused per-row ops), so a request's logits have the same bits whatever it is batched with."""
    prompts, _ = expected
    engine = make_engine(prefix_caching=False)
    if not (engine.runner.decode_kernel and engine.model.lm_head.packed is not None):
        pytest.skip("the CPU kernels are not built here")
    rows: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def spy(inputs):
        logits = execute(inputs)
        for item, row in zip(inputs.sampled, logits):
            rows.setdefault(item.request.request_id, []).append(row.clone())
        return logits

    engine.runner.execute = spy
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = engine.generate([prompts[2]], params)[0]
    batched = engine.generate(prompts, params)[2]
    assert alone.token_ids == batched.token_ids
    got, want = rows[batched.request_id], rows[alone.request_id]
    assert len(got) == len(want) == 6
    assert all(torch.equal(a, b) for a, b in zip(got, want))
