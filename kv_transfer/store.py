"""A KVCache seen as the receiver's BlockStore: pool calls under the engine's lock."""
from __future__ import annotations

import threading

import torch

from engine.kv_cache import KVCache


class KVCacheStore:
    def __init__(self, kv: KVCache, lock: threading.Lock | threading.RLock):
        self.kv = kv
        self.lock = lock  # the same lock the engine's step runs under: the pool is not thread-safe

    def allocate(self, num_tokens: int) -> list[int]:
        with self.lock:
            return self.kv.pool.allocate(self.kv.blocks_for(num_tokens))

    def free(self, block_ids: list[int]) -> None:
        with self.lock:
            self.kv.pool.free(block_ids)

    def write(self, layer: int, block_ids: list[int], start: int, kv: torch.Tensor) -> None:
        # No lock: the blocks are leased to this request alone, so the engine never touches them.
        self.kv.write_tokens(layer, block_ids, start, kv)
