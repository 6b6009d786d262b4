"""Paged attention over a flat (varlen) token batch.

The step's tokens are laid out decode-first: the first `num_decode` rows are attended one
query at a time, each to its own context through its request's block table (a token each of
requests that only need their next token and, with the CPU kernel, the tokens of short
prefill chunks: see engine/model_runner.py); after them come the query chunks of the other
prefilling requests, one contiguous run per request.

Every layer first writes the new K/V into the paged cache at `slot_mapping`, then
reads the context back through block tables. Decode tokens are attended in one
batched call: on CPU (float32/bfloat16/float16) by the fused paged kernel of
engine/kernels/cpu_ops.py, which reads K/V in place through the block tables up to
each request's context length; otherwise (CUDA, other dtypes, the kernel failed to build,
or PDSERVE_ATTENTION=sdpa) by gathering the blocks into a copy padded to the longest
context and one masked SDPA call. Prefill chunks are attended one request at a time,
which is few calls per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the flat batch
    length: int  # query tokens in this chunk
    context: int  # tokens attended to: cached prefix + this chunk
    block_table: torch.Tensor | None  # [blocks] long; None when the chunk is the whole context
    mask: torch.Tensor | None  # [length, context] bool, causal with the cached-prefix offset


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long, where each new token's K/V goes
    num_decode: int  # leading rows attended one query each (decode tokens, short chunks' tokens)
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] long (padded with 0)
    # [num_decode, 1, 1, max_blocks * block_size] bool; only for the SDPA path (None with the kernel)
    decode_mask: torch.Tensor | None
    prefills: list[PrefillChunk]
    decode_context_lens: torch.Tensor | None = None  # [num_decode] long, tokens each decode attends
    decode_kernel: bool = False  # decode through the fused paged kernel (see decode_kernel_enabled)
    store_kernel: bool = False  # write new K/V with the C++ store_kv (CPU, kernels built)


def decode_kernel_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode attention over a KV cache of this device/dtype uses the fused kernel.

    Builds the kernel on the first call in a process (seconds; cached on disk after the first
    build); False when it cannot be built or PDSERVE_ATTENTION=sdpa."""
    return (torch.device(device).type == "cpu" and dtype in cpu_ops.SUPPORTED_DTYPES
            and cpu_ops.available())


def causal_mask(length: int, context: int, device: torch.device) -> torch.Tensor:
    """[length, context] bool: query i (at position context - length + i) sees keys <= its position."""
    query_pos = torch.arange(context - length, context, device=device)
    return torch.arange(context, device=device)[None, :] <= query_pos[:, None]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KV, D], kv_layer [2, num_blocks, block_size, KV, D] -> [T, H, D]."""
    if meta.store_kernel:
        cpu_ops.store_kv(kv_layer, meta.slot_mapping, k, v)
    else:
        num_blocks, block_size, kv_heads, head_dim = kv_layer.shape[1:]
        slots = kv_layer.view(2, num_blocks * block_size, kv_heads, head_dim)
        slots[0].index_copy_(0, meta.slot_mapping, k)
        slots[1].index_copy_(0, meta.slot_mapping, v)

    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd and meta.decode_kernel:
        dst = out[:nd]
        if dst.is_contiguous():
            cpu_ops.paged_decode_attention(q[:nd], kv_layer, meta.decode_block_tables,
                                           meta.decode_context_lens, scale, out=dst)
        else:
            dst.copy_(cpu_ops.paged_decode_attention(
                q[:nd], kv_layer, meta.decode_block_tables, meta.decode_context_lens, scale))
    elif nd:
        # [nd, max_blocks, block_size, KV, D] -> [nd, KV, S, D]
        keys = kv_layer[0][meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
        values = kv_layer[1][meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=scale,
            enable_gqa=True)  # [nd, H, 1, D]
        out[:nd] = o.squeeze(2)
    for chunk in meta.prefills:
        span = slice(chunk.start, chunk.start + chunk.length)
        query = q[span].transpose(0, 1).unsqueeze(0)  # [1, H, len, D]
        if chunk.block_table is None:
            keys, values = k[span], v[span]
        else:
            # [blocks, block_size, KV, D] -> [context, KV, D]
            keys = kv_layer[0][chunk.block_table].flatten(0, 1)[:chunk.context]
            values = kv_layer[1][chunk.block_table].flatten(0, 1)[:chunk.context]
        o = F.scaled_dot_product_attention(
            query, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True)
        out[span] = o.squeeze(0).transpose(0, 1)
    return out
