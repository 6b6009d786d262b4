"""Exact tests of the scheduler: token budget, chunked prefill, batch size, preemption, prefix reuse."""
import torch

from engine.config import CacheConfig, ModelConfig, SchedulerConfig
from engine.kv_cache import KVCache
from engine.request import FinishReason, Request, RequestStatus
from engine.sampler import SamplingState
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

TINY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=4,
                   intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4)


def make(budget=64, num_blocks=16, block_size=4, max_seqs=8, chunked=True, prefix=True):
    kv = KVCache(TINY, CacheConfig(block_size, num_blocks, prefix), torch.float32,
                 torch.device("cpu"))
    return Scheduler(SchedulerConfig(max_seqs, budget, chunked), kv)


def req(rid, tokens):
    params = SamplingParams(temperature=0)
    return Request(rid, list(tokens), params, SamplingState(params, list(tokens), [], None))


def plan(out):
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def step(sched, sample_token=1):
    """One scheduler step as the engine does it, appending `sample_token` where one is sampled."""
    out = sched.schedule()
    samplers = [s.request for s in out.scheduled if s.samples]
    sched.update(out)
    for r in samplers:
        r.append_output(sample_token)
    return out


def test_budget_chunks_the_second_prompt_and_leaves_the_third_waiting():
    sched = make(budget=16)
    for i, rid in enumerate("abc"):
        sched.add(req(rid, range(100 * i, 100 * i + 10)))  # distinct: no prefix hits
    out = step(sched)
    assert plan(out) == [("a", 10), ("b", 6)]
    assert [r.request_id for r in sched.waiting] == ["c"]
    # a decodes (1), b finishes its prompt (4), c gets the rest of the budget (10 fits in 11)
    assert plan(step(sched)) == [("a", 1), ("b", 4), ("c", 10)]
    assert plan(step(sched)) == [("a", 1), ("b", 1), ("c", 1)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make(budget=16, chunked=False)
    sched.add(req("a", range(10)))
    sched.add(req("b", range(20, 30)))
    assert plan(step(sched)) == [("a", 10)]
    assert plan(step(sched)) == [("a", 1), ("b", 10)]


def test_batch_size_limit():
    sched = make(max_seqs=2)
    for rid in "abc":
        sched.add(req(rid, range(3)))
    assert plan(step(sched)) == [("a", 3), ("b", 3)]
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_blocks_follow_the_token_count():
    sched = make(block_size=4)
    a = req("a", range(8))
    sched.add(a)
    step(sched)
    assert a.block_ids == [0, 1]
    step(sched)  # computes token 8 -> needs a third block
    assert a.block_ids == [0, 1, 2] and a.num_computed_tokens == 9


def test_preemption_frees_the_newest_and_requeues_it_first():
    sched = make(num_blocks=4, block_size=4, prefix=False)
    a, b, c = req("a", range(8)), req("b", range(8)), req("c", range(2))
    for r in (a, b, c):
        sched.add(r)
    assert plan(step(sched)) == [("a", 8), ("b", 8)]  # 4 blocks used; c waits
    out = step(sched)  # both need a third block: b is preempted so a can grow
    assert [r.request_id for r in out.preempted] == ["b"]
    assert plan(out) == [("a", 1)]
    assert a.block_ids == [0, 1, 3]  # b's blocks were freed tail first
    assert b.status == RequestStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert b.token_ids == list(range(8)) + [1]  # its sampled token survives for the recompute


def test_preempted_request_recomputes_prompt_and_outputs():
    sched = make(num_blocks=6, block_size=4, prefix=False)
    a, b = req("a", range(8)), req("b", range(8))
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)  # a: 3 blocks, b: 3 blocks -> pool full
    sched.finish(a, FinishReason.STOP)
    assert sched.kv.pool.num_free == 3
    b_tokens = b.num_tokens
    sched._preempt(sched.running.pop())  # force it
    assert plan(step(sched)) == [("b", b_tokens)]


def test_request_that_cannot_fit_even_alone_finishes_with_length():
    sched = make(num_blocks=2, block_size=4)
    a = req("a", range(8))
    sched.add(a)
    step(sched)
    out = step(sched)  # needs a third block; the pool has two
    assert out.finished == [a] and a.finish_reason == FinishReason.LENGTH
    assert sched.kv.pool.num_free == 2


def test_prefix_cache_hit_skips_computed_blocks():
    sched = make(block_size=4)
    a = req("a", range(10))
    sched.add(a)
    step(sched)
    a_blocks = list(a.block_ids)
    sched.finish(a, FinishReason.STOP)
    b = req("b", list(range(8)) + [50, 51, 52])
    sched.add(b)
    out = step(sched)
    assert plan(out) == [("b", 3)]  # 8 of 11 tokens came from the cache
    assert b.block_ids[:2] == a_blocks[:2]
    assert b.num_prefix_hit_tokens == 8


def test_full_prompt_hit_still_computes_the_last_block():
    sched = make(block_size=4)
    a = req("a", range(8))
    sched.add(a)
    step(sched)
    sched.finish(a, FinishReason.STOP)
    b = req("b", range(8))
    sched.add(b)
    assert plan(step(sched)) == [("b", 4)]


def test_finish_returns_every_block():
    sched = make(num_blocks=8, block_size=4, prefix=False)
    rs = [req(str(i), range(5)) for i in range(3)]
    for r in rs:
        sched.add(r)
    step(sched)
    for r in rs:
        sched.finish(r, FinishReason.ABORT)
    assert sched.kv.pool.num_free == 8 and sched.num_unfinished == 0
