"""One paged KV tensor per engine, and the token <-> slot arithmetic over block tables.

Layout: [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim].
A token at position p of a request lives in slot
    block_table[p // block_size] * block_size + p % block_size
of the flattened [num_blocks * block_size] axis.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.block_pool import BlockPool
from engine.config import CacheConfig, ModelConfig


def slot_mapping(block_ids: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Slots of positions [start, end) of one request whose block table is `block_ids` [n]."""
    positions = torch.arange(start, end, device=block_ids.device)
    return block_ids[positions // block_size] * block_size + positions % block_size


class KVCache:
    def __init__(self, model: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                 device: torch.device):
        self.block_size = cache.block_size
        self.num_blocks = cache.num_blocks
        self.num_layers = model.num_layers
        self.kv_heads = model.num_kv_heads
        self.head_dim = model.head_dim
        self.dtype = dtype
        self.device = device
        self.tensor = torch.zeros(
            model.num_layers, 2, cache.num_blocks, cache.block_size, model.num_kv_heads,
            model.head_dim, dtype=dtype, device=device)
        self.pool = BlockPool(cache.num_blocks, cache.enable_prefix_caching)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.tensor.element_size()

    def layer_slots(self, layer: int) -> torch.Tensor:
        """[2, num_blocks * block_size, kv_heads, head_dim] view of one layer."""
        return self.tensor[layer].view(2, -1, self.kv_heads, self.head_dim)

    def _slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        needed = self.blocks_for(end)
        if needed > len(block_ids):
            raise ValueError(f"tokens up to {end} need {needed} blocks, the table has {len(block_ids)}")
        table = torch.as_tensor(list(block_ids[:needed]), dtype=torch.long, device=self.device)
        return slot_mapping(table, start, end, self.block_size)

    def read_tokens(self, layer: int, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Gather positions [start, end) of one layer: [2, end - start, kv_heads, head_dim] (a copy)."""
        return self.layer_slots(layer)[:, self._slots(block_ids, start, end)]

    def write_tokens(self, layer: int, block_ids: Sequence[int], start: int,
                     kv: torch.Tensor) -> None:
        """Scatter kv [2, n, kv_heads, head_dim] into positions [start, start + n); casts dtype."""
        expected = (2, self.kv_heads, self.head_dim)
        if kv.dim() != 4 or (kv.shape[0], kv.shape[2], kv.shape[3]) != expected:
            raise ValueError(f"KV shape {tuple(kv.shape)} does not fit [2, n, {self.kv_heads}, {self.head_dim}]")
        slots = self._slots(block_ids, start, start + kv.shape[1])
        self.layer_slots(layer)[:, slots] = kv.to(device=self.device, dtype=self.dtype)
