"""The router's approximate view of each prefill worker's prefix cache.

Per worker, a bounded LRU of the block hashes of the prompts the router sent it, hashed with
engine.block_pool.hash_full_blocks at that worker's block size, so they are the hashes the
worker's own cache uses. Approximate: the worker may have evicted blocks the index still lists
(it is never asked), and the bound should match the worker's block count so it rarely does.

A prompt's hashes are recorded last block first, so its first block is the most recently used:
the hashes chain, a prefix matches only from block 0 on, and losing the head would make the
rest useless, so the tail goes first (as BlockPool.free does).

Workers not added (or removed) have an empty cache: overlap is 0 and record does nothing, so a
worker that leaves while a request is being routed needs no special care.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_pool import hash_full_blocks


@dataclass
class _WorkerCache:
    block_size: int
    capacity: int
    lru: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # least recent first


class PrefixIndex:
    def __init__(self) -> None:
        self._workers: dict[str, _WorkerCache] = {}

    def add_worker(self, worker_id: str, block_size: int, capacity_blocks: int) -> None:
        """Starts an empty view of `worker_id`'s cache (replacing any: a restarted worker's
        cache is empty)."""
        if block_size < 1 or capacity_blocks < 1:
            raise ValueError(f"block_size and capacity_blocks must be >= 1, "
                             f"got {block_size} and {capacity_blocks}")
        self._workers[worker_id] = _WorkerCache(block_size, capacity_blocks)

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    @property
    def worker_ids(self) -> list[str]:
        return sorted(self._workers)

    def block_size(self, worker_id: str) -> int:
        return self._workers[worker_id].block_size

    def num_blocks(self, worker_id: str) -> int:
        cache = self._workers.get(worker_id)
        return len(cache.lru) if cache else 0

    def hashes(self, worker_id: str, token_ids: Sequence[int]) -> list[bytes]:
        """The prompt's full-block hashes at `worker_id`'s block size."""
        return hash_full_blocks(token_ids, self._workers[worker_id].block_size)

    def overlap(self, worker_id: str, hashes: Sequence[bytes]) -> int:
        """How many of the leading `hashes` the worker is believed to hold. A query only: it
        does not refresh the LRU (only the worker the request goes to should be refreshed)."""
        cache = self._workers.get(worker_id)
        if cache is None:
            return 0
        matched = 0
        for block_hash in hashes:
            if block_hash not in cache.lru:
                break
            matched += 1
        return matched

    def overlaps(self, token_ids: Sequence[int]) -> dict[str, int]:
        """overlap() for every worker, hashing the prompt once per distinct block size."""
        by_size: dict[int, list[bytes]] = {}
        result = {}
        for worker_id, cache in self._workers.items():
            if cache.block_size not in by_size:
                by_size[cache.block_size] = hash_full_blocks(token_ids, cache.block_size)
            result[worker_id] = self.overlap(worker_id, by_size[cache.block_size])
        return result

    def record(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        """The prompt with these hashes was sent to `worker_id`: its blocks are now the most
        recently used there; the least recently used ones beyond the capacity are dropped."""
        cache = self._workers.get(worker_id)
        if cache is None:
            return
        for block_hash in reversed(hashes):
            cache.lru[block_hash] = None
            cache.lru.move_to_end(block_hash)
        while len(cache.lru) > cache.capacity:
            cache.lru.popitem(last=False)
