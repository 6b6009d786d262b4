"""Exact tests of the block pool and prefix cache: block ids, reference counts, eviction order."""
import pytest

from engine.block_pool import BlockPool, NoFreeBlocksError, hash_block_tokens, hash_full_blocks


def test_allocate_takes_lowest_ids_first_and_counts_refs():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert [b.ref_count for b in pool.blocks] == [1, 1, 1, 0]
    assert pool.num_free == 1


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(NoFreeBlocksError, match="asked for 2 KV blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1


def test_free_appends_tail_block_first():
    pool = BlockPool(5)
    ids = pool.allocate(3)  # [0, 1, 2]; free list [3, 4]
    pool.free(ids)
    assert pool.free_block_ids() == [3, 4, 2, 1, 0]
    assert all(b.ref_count == 0 for b in pool.blocks)


def test_double_free_is_an_error():
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([b])


def test_hash_chain_depends_on_the_whole_prefix():
    a = hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_full_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[1] != b[1]  # same second block, different parent
    assert a[0] == hash_block_tokens(None, [1, 2, 3, 4])
    assert a[1] == hash_block_tokens(a[0], [5, 6, 7, 8])
    assert hash_full_blocks([1, 2, 3], 4) == []  # partial blocks have no hash


def _cache(pool, tokens, block_size):
    hashes = hash_full_blocks(tokens, block_size)
    ids = pool.allocate(len(hashes))
    for i, (bid, h) in enumerate(zip(ids, hashes)):
        pool.cache_block(bid, h, tokens[i * block_size:(i + 1) * block_size])
    return ids, hashes


def test_prefix_hit_shares_blocks_and_counts_refs():
    pool = BlockPool(8)
    tokens = list(range(12))
    ids, hashes = _cache(pool, tokens, 4)
    hits = pool.lookup(hashes, tokens, 4)
    assert hits == ids
    pool.touch(hits)
    assert [pool.blocks[i].ref_count for i in ids] == [2, 2, 2]
    pool.free(ids)
    pool.free(hits)
    assert pool.num_free == 8 and pool.num_cached == 3  # freed but still findable
    assert pool.lookup(hashes[:2], tokens, 4) == ids[:2]


def test_partial_prefix_hit_stops_at_first_miss():
    pool = BlockPool(8)
    tokens = list(range(12))
    ids, hashes = _cache(pool, tokens, 4)
    other = tokens[:4] + [99, 98, 97, 96] + tokens[8:]
    assert pool.lookup(hash_full_blocks(other, 4), other, 4) == ids[:1]


def test_hit_is_verified_against_tokens():
    pool = BlockPool(4)
    tokens = [1, 2, 3, 4]
    ids, hashes = _cache(pool, tokens, 4)
    # A forged hash collision: same hash, other tokens -> a miss.
    assert pool.lookup(hashes, [5, 6, 7, 8], 4) == []
    assert pool.lookup(hashes, tokens, 4) == ids


def test_touch_of_free_cached_block_removes_it_from_free_list():
    pool = BlockPool(3)
    ids, hashes = _cache(pool, [1, 2, 3, 4], 4)
    pool.free(ids)
    assert pool.free_block_ids() == [1, 2, 0]
    pool.touch(ids)
    assert pool.free_block_ids() == [1, 2]
    assert pool.blocks[0].ref_count == 1


def test_lru_eviction_order_of_cached_blocks():
    pool = BlockPool(3)
    a_ids, a_hashes = _cache(pool, [1, 1, 1, 1], 4)  # block 0
    b_ids, b_hashes = _cache(pool, [2, 2, 2, 2], 4)  # block 1
    pool.free(a_ids)  # a freed first -> evicted first
    pool.free(b_ids)
    assert pool.free_block_ids() == [2, 0, 1]
    assert pool.allocate(1) == [2]  # the never-used block first
    assert pool.allocate(1) == [0]  # then the least recently freed: a is evicted
    assert pool.num_cached == 1
    assert pool.lookup(a_hashes, [1, 1, 1, 1], 4) == []
    assert pool.lookup(b_hashes, [2, 2, 2, 2], 4) == b_ids


def test_duplicate_content_is_cached_once():
    pool = BlockPool(4)
    h = hash_block_tokens(None, [7, 7])
    first, second = pool.allocate(2)
    pool.cache_block(first, h, [7, 7])
    pool.cache_block(second, h, [7, 7])
    assert pool.num_cached == 1 and pool.blocks[second].block_hash is None


def test_prefix_caching_off_caches_nothing():
    pool = BlockPool(4, enable_prefix_caching=False)
    ids, hashes = _cache(pool, [1, 2, 3, 4], 4)
    assert pool.num_cached == 0
    assert pool.lookup(hashes, [1, 2, 3, 4], 4) == []


def test_hit_rate_counters():
    pool = BlockPool(8)
    tokens = list(range(8))
    _, hashes = _cache(pool, tokens, 4)
    pool.lookup(hashes + [b"x" * 16], tokens + [0, 0, 0, 0], 4)
    assert (pool.hits, pool.queries) == (2, 3)
