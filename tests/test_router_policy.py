"""router.policy (pair selection) and router.prefix_index (the router's view of prefix caches)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_pool import hash_full_blocks
from router.policy import (DecodeView, NoPair, NoPairReason, Pair, PolicyWeights, PrefillView,
                           choose_pair, decode_score, prefill_cost)
from router.prefix_index import PrefixIndex

W = PolicyWeights()


def P(worker_id: str, queue_depth: int = 0, queued_tokens: int = 0, overlap: int = 0,
      block_size: int = 16, alive: bool = True, draining: bool = False) -> PrefillView:
    return PrefillView(worker_id, alive, draining, queue_depth, queued_tokens, overlap, block_size)


def D(worker_id: str, free: int = 100, total: int = 100, running: int = 0, waiting: int = 0,
      max_num_seqs: int = 64, block_size: int = 16, alive: bool = True,
      draining: bool = False) -> DecodeView:
    return DecodeView(worker_id, alive, draining, free, total, running, waiting, max_num_seqs,
                      block_size)


# ---------------------------------------------------------------- prefill side

def test_more_prefix_overlap_wins_when_queues_are_equal():
    got = choose_pair([P("p0", overlap=1), P("p1", overlap=3), P("p2", overlap=2)], [D("d0")], 100)
    assert got == Pair("p1", "d0", 7)  # ceil(100 / 16) = 7 blocks leased


def test_queued_work_outweighs_a_smaller_cache_hit():
    # p0: 48 cached tokens but 200 queued -> cost 200 + 32 + 100 - 48 = 284
    # p1: nothing cached, idle               -> cost 100
    prefills = [P("p0", queue_depth=1, queued_tokens=200, overlap=3), P("p1")]
    assert prefill_cost(prefills[0], 100, W) == 284 and prefill_cost(prefills[1], 100, W) == 100
    assert choose_pair(prefills, [D("d0")], 100).prefill_id == "p1"
    # ... until the hit saves more than the queue costs: 64 cached tokens vs 20 queued + 32
    prefills = [P("p0", queue_depth=1, queued_tokens=20, overlap=4), P("p1")]
    assert choose_pair(prefills, [D("d0")], 100).prefill_id == "p0"  # 20 + 32 + 100 - 64 = 88 < 100


def test_overlap_counts_in_tokens_at_each_workers_block_size():
    # 2 blocks of 32 (64 tokens) beat 3 blocks of 16 (48 tokens)
    got = choose_pair([P("p0", overlap=3, block_size=16), P("p1", overlap=2, block_size=32)], [D("d0")], 100)
    assert got.prefill_id == "p1"
    # a hit never counts for more than the prompt itself
    assert prefill_cost(P("p0", overlap=10, block_size=16), 40, W) == 0


def test_queue_depth_breaks_equal_token_queues():
    got = choose_pair([P("p0", queue_depth=4, queued_tokens=64), P("p1", queue_depth=1, queued_tokens=64)],
                      [D("d0")], 10)
    assert got.prefill_id == "p1"


def test_dead_and_draining_prefills_are_never_picked():
    prefills = [P("p0", overlap=5, alive=False), P("p1", overlap=5, draining=True), P("p2", queued_tokens=10**6)]
    assert choose_pair(prefills, [D("d0")], 80).prefill_id == "p2"


# ---------------------------------------------------------------- decode side

def test_a_decode_without_enough_free_blocks_is_never_picked():
    # 100 tokens need 7 blocks of 16; d0 is idle and huge but has 6 free
    decodes = [D("d0", free=6, total=10_000), D("d1", free=7, total=7, running=63)]
    assert choose_pair([P("p0")], decodes, 100) == Pair("p0", "d1", 7)


def test_lease_size_uses_each_decode_workers_block_size():
    # 100 tokens: 7 blocks of 16, 4 blocks of 32; both have 5 free
    decodes = [D("d0", free=5, total=50, block_size=16), D("d1", free=5, total=50, block_size=32)]
    assert choose_pair([P("p0")], decodes, 100) == Pair("p0", "d1", 4)


def test_decode_prefers_headroom_and_a_lighter_batch():
    assert decode_score(D("d", free=60, total=100, running=16, max_num_seqs=64), 160, W) == pytest.approx(0.25)
    # d0: (60 - 10) / 100 - 16 / 64 = 0.25; d1: (90 - 10) / 100 - 48 / 64 = 0.05; d2: (30 - 10) / 100 - 0 = 0.2
    decodes = [D("d0", free=60, running=16), D("d1", free=90, running=40, waiting=8), D("d2", free=30)]
    assert choose_pair([P("p0")], decodes, 160).decode_id == "d0"
    # weights move the choice: with load ignored, headroom alone picks d1
    assert choose_pair([P("p0")], decodes, 160, PolicyWeights(load_weight=0)).decode_id == "d1"


def test_dead_and_draining_decodes_are_never_picked():
    decodes = [D("d0", alive=False), D("d1", draining=True), D("d2", free=10, running=60)]
    assert choose_pair([P("p0")], decodes, 16).decode_id == "d2"


def test_ties_go_to_the_lowest_worker_id_in_any_input_order():
    prefills = [P("p2"), P("p1"), P("p3")]
    decodes = [D("d9"), D("d10"), D("d2")]
    results = {choose_pair(list(ps), list(ds), 50)
               for ps in itertools.permutations(prefills) for ds in itertools.permutations(decodes)}
    assert results == {Pair("p1", "d10", 4)}  # string order: "d10" < "d2" < "d9"


# ---------------------------------------------------------------- no pair

def test_no_live_prefill():
    got = choose_pair([P("p0", alive=False), P("p1", draining=True)], [D("d0")], 10)
    assert isinstance(got, NoPair) and got.reason is NoPairReason.NO_PREFILL
    assert "2 known" in got.detail
    assert choose_pair([], [D("d0")], 10).reason is NoPairReason.NO_PREFILL


def test_no_live_decode():
    got = choose_pair([P("p0")], [D("d0", alive=False), D("d1", draining=True)], 10)
    assert got.reason is NoPairReason.NO_DECODE


def test_too_large_needs_room_for_the_prompt_and_one_generated_token():
    decodes = [D("d0", free=4, total=4), D("d1", free=0, total=2, block_size=32)]  # both hold 64 tokens
    assert choose_pair([P("p0")], decodes, 63) == Pair("p0", "d0", 4)
    got = choose_pair([P("p0")], decodes, 64)  # 65 tokens: 5 blocks of 16, 3 of 32
    assert got.reason is NoPairReason.TOO_LARGE and "largest holds 64 tokens" in got.detail
    # a draining worker that could hold it does not count: it is going away
    assert choose_pair([P("p0")], decodes + [D("d2", total=100, draining=True)], 64).reason is NoPairReason.TOO_LARGE


def test_full_decodes_mean_wait_not_refuse():
    got = choose_pair([P("p0")], [D("d0", free=3, total=100), D("d1", free=0, total=100)], 64)
    assert got.reason is NoPairReason.DECODE_FULL and "64 prompt tokens" in got.detail


def test_bad_inputs_are_programming_errors():
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        choose_pair([P("p0")], [D("d0")], 0)
    with pytest.raises(ValueError, match="free_blocks"):
        D("d0", free=-1)
    with pytest.raises(ValueError, match="block_size"):
        P("p0", block_size=0)
    with pytest.raises(ValueError, match="load_weight"):
        PolicyWeights(load_weight=float("nan"))


_PREFILLS = st.lists(st.builds(P, st.sampled_from(["p0", "p1", "p2", "p3"]), st.integers(0, 8),
                               st.integers(0, 4096), st.integers(0, 20), st.sampled_from([8, 16, 32]),
                               st.booleans(), st.booleans()), max_size=4, unique_by=lambda p: p.worker_id)
_DECODES = st.lists(st.builds(lambda i, total, used, run, wait, bs, alive, drain: D(
    i, free=total - min(used, total), total=total, running=run, waiting=wait, block_size=bs,
    alive=alive, draining=drain), st.sampled_from(["d0", "d1", "d2", "d3"]), st.integers(0, 64),
    st.integers(0, 64), st.integers(0, 64), st.integers(0, 8), st.sampled_from([8, 16, 32]),
    st.booleans(), st.booleans()), max_size=4, unique_by=lambda d: d.worker_id)


@settings(max_examples=300, deadline=None, database=None)
@given(_PREFILLS, _DECODES, st.integers(1, 600))
def test_a_chosen_pair_is_always_live_with_room_and_order_free(prefills, decodes, n):
    got = choose_pair(prefills, decodes, n)
    assert got == choose_pair(prefills[::-1], decodes[::-1], n)
    if isinstance(got, NoPair):
        return
    p = next(v for v in prefills if v.worker_id == got.prefill_id)
    d = next(v for v in decodes if v.worker_id == got.decode_id)
    assert p.alive and not p.draining and d.alive and not d.draining
    assert got.lease_blocks == -(-n // d.block_size) <= d.free_blocks


# ---------------------------------------------------------------- prefix index

def _blocks(start: int, n: int, block_size: int = 4) -> list[int]:
    return list(range(start, start + n * block_size))


def test_overlap_counts_the_leading_blocks_sent_before():
    index = PrefixIndex()
    index.add_worker("p0", block_size=4, capacity_blocks=100)
    sent = _blocks(0, 3) + [99]  # 3 full blocks and a partial one (not hashed)
    index.record("p0", index.hashes("p0", sent))
    assert index.num_blocks("p0") == 3
    assert index.overlap("p0", index.hashes("p0", sent)) == 3
    assert index.overlap("p0", index.hashes("p0", _blocks(0, 2) + [7, 7, 7, 7])) == 2
    assert index.overlap("p0", index.hashes("p0", [1000] + _blocks(1, 3))) == 0  # chained: head differs
    assert index.overlap("p0", index.hashes("p0", _blocks(0, 5))) == 3


def test_hashes_are_the_block_pools_at_the_workers_block_size():
    index = PrefixIndex()
    index.add_worker("p0", block_size=4, capacity_blocks=10)
    index.add_worker("p1", block_size=8, capacity_blocks=10)
    tokens = _blocks(0, 4)
    assert index.hashes("p0", tokens) == hash_full_blocks(tokens, 4)
    assert index.hashes("p1", tokens) == hash_full_blocks(tokens, 8)
    index.record("p0", index.hashes("p0", tokens))
    index.record("p1", index.hashes("p1", tokens[:8]))
    assert index.overlaps(tokens) == {"p0": 4, "p1": 1}


def test_lru_drops_the_tail_of_the_oldest_prompt_first():
    index = PrefixIndex()
    index.add_worker("p0", block_size=4, capacity_blocks=4)
    a, b = index.hashes("p0", _blocks(0, 3)), index.hashes("p0", _blocks(100, 3))
    index.record("p0", a)
    index.record("p0", b)  # 6 blocks > 4: a's last two blocks go
    assert (index.overlap("p0", a), index.overlap("p0", b), index.num_blocks("p0")) == (1, 3, 4)
    index.record("p0", a[:1])  # a's head becomes the most recent; b's tail goes next
    index.record("p0", index.hashes("p0", _blocks(200, 1)))
    assert (index.overlap("p0", a), index.overlap("p0", b)) == (1, 2)


def test_overlap_is_a_query_and_does_not_refresh():
    index = PrefixIndex()
    index.add_worker("p0", block_size=4, capacity_blocks=2)
    a, b = index.hashes("p0", _blocks(0, 1)), index.hashes("p0", _blocks(100, 1))
    index.record("p0", a)
    index.record("p0", b)
    assert index.overlap("p0", a) == 1  # asking about a ...
    index.record("p0", index.hashes("p0", _blocks(200, 1)))
    assert (index.overlap("p0", a), index.overlap("p0", b)) == (0, 1)  # ... did not save it


def test_a_prompt_longer_than_the_capacity_keeps_its_head():
    index = PrefixIndex()
    index.add_worker("p0", block_size=4, capacity_blocks=3)
    hashes = index.hashes("p0", _blocks(0, 5))
    index.record("p0", hashes)
    assert index.overlap("p0", hashes) == 3


def test_removed_and_unknown_workers_have_an_empty_cache():
    index = PrefixIndex()
    index.add_worker("p0", block_size=4, capacity_blocks=10)
    hashes = index.hashes("p0", _blocks(0, 2))
    index.record("p0", hashes)
    index.remove_worker("p0")
    index.record("p0", hashes)  # a request routed while the worker left: ignored
    assert index.overlap("p0", hashes) == 0 and index.worker_ids == []
    index.add_worker("p0", block_size=4, capacity_blocks=10)
    assert index.overlap("p0", hashes) == 0  # a restarted worker starts cold
    index.remove_worker("never-added")
    with pytest.raises(ValueError):
        index.add_worker("p1", block_size=0, capacity_blocks=10)
