"""The pool of KV blocks: free list, reference counts and the prefix cache.

A block is either in use (ref_count > 0) or free. A free block that still holds a
full, hashed block of tokens stays findable in the prefix cache until it is
evicted, which happens when it reaches the front of the free list and is handed
out again. Blocks are appended to the free list when freed, so eviction order is
least recently freed first (LRU).

The prefix hash of a full block chains the hash of the block before it with the
block's own tokens, so equal hashes mean equal whole prefixes. `hash_block_tokens`
is the one hash function: the router uses it to score prefix overlap, and prefill
and decode workers use it for their caches.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: blake2b(parent hash || tokens as little-endian uint32)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent_hash or b"")
    digest.update(np.asarray(token_ids, dtype="<u4").tobytes())
    return digest.digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int,
                     parent_hash: bytes | None = None) -> list[bytes]:
    """Hashes of every full block of `token_ids` (a trailing partial block has none)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start:start + block_size])
        hashes.append(parent_hash)
    return hashes


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None  # kept to verify a hash hit


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self.hits = 0  # prefix-cache lookups, counted in blocks
        self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the front of the free list, evicting their cached contents."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = block.token_ids = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. The request's last block is freed first so
        that, among its blocks, the tail (least likely shared) is evicted first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference to blocks found in the prefix cache."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def lookup(self, block_hashes: Sequence[bytes], token_ids: Sequence[int],
               block_size: int) -> list[int]:
        """Longest run of cached blocks matching the prompt's leading full blocks.
        Each hit is checked against the tokens, so a hash collision is a miss."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for i, block_hash in enumerate(block_hashes):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            expected = tuple(token_ids[i * block_size:(i + 1) * block_size])
            if self.blocks[block_id].token_ids != expected:
                break
            hits.append(block_id)
        self.queries += len(block_hashes)
        self.hits += len(hits)
        return hits

    def cache_block(self, block_id: int, block_hash: bytes, token_ids: Sequence[int]) -> None:
        """Make a full, computed block findable by its prefix hash."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return  # already cached, or another block holds the same prefix
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block_id

    def free_block_ids(self) -> list[int]:
        """Free list in eviction order (front first); for tests and metrics."""
        return list(self._free)

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._cached.values()):
            block = self.blocks[block_id]
            block.block_hash = block.token_ids = None
        self._cached.clear()
