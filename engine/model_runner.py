"""Turns a scheduled step into flat tensors, runs the model, returns logits of sampled rows.

Flat layout of one step (decode-first, see engine/attention.py):
    [ d_0 d_1 ... d_{nd-1} | chunk of p_0 | chunk of p_1 | ... ]
where each d_i is the single new token of a request that needs one token.

With the CPU attention kernel, prefill chunks whose context is short (at most
KERNEL_PREFILL_MAX_CONTEXT tokens) go first among the chunks and their tokens join the decode
rows: the kernel attends each to its own causal context (its position + 1 tokens) through the
request's block table, which beat one causal SDPA call per chunk up to 512-token contexts (16 x
128 tokens: 4.8 against 9.8 ms a layer) and lost from 1024 on (30 against 27 ms).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillChunk, causal_mask, decode_kernel_enabled
from engine.kv_cache import KVCache
from engine.models.llama import LlamaModel
from engine.scheduler import ScheduledRequest

KERNEL_PREFILL_MAX_CONTEXT = 512


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    ordered: list[ScheduledRequest]  # in flat-batch order
    starts: list[int]  # first flat index of each request in `ordered`
    sample_rows: torch.Tensor  # [S] flat index of the last token of each sampling request
    sampled: list[ScheduledRequest]  # the S sampling requests, same order


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv = kv_cache
        self.device = device
        # Decode attention through the fused paged kernel (CPU) or masked SDPA; decided (and the
        # kernel built, if need be) once, when the engine is created rather than mid-request.
        self.decode_kernel = decode_kernel_enabled(device, kv_cache.dtype)

    def prepare(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        bs = self.kv.block_size
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        row_items = decodes
        if self.decode_kernel:  # short chunks first: their rows are attended as decode rows
            short = [self._context(s) <= KERNEL_PREFILL_MAX_CONTEXT for s in prefills]
            prefills = ([s for s, is_short in zip(prefills, short) if is_short]
                        + [s for s, is_short in zip(prefills, short) if not is_short])
            row_items = decodes + prefills[:sum(short)]
        ordered = decodes + prefills
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts: list[int] = []
        for item in ordered:
            req, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            starts.append(len(ids))
            ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            table = req.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))

        # rows attended one query at a time: the decode tokens, plus the tokens of short
        # prefill chunks when the kernel runs them
        nd = sum(s.num_new_tokens for s in row_items)
        decode_tables = decode_mask = ctx = None
        if nd:
            max_blocks = self.kv.blocks_for(max(self._context(s) for s in row_items))
            padded = [ids + [0] * (max_blocks - len(ids))
                      for ids in (s.request.block_ids[:max_blocks] for s in row_items)]
            tables = torch.tensor(padded, dtype=torch.long, device=self.device)
            ctx = torch.tensor(positions[:nd], dtype=torch.long, device=self.device) + 1
            if nd == len(row_items):  # one row per request
                decode_tables = tables
            else:
                per_item = torch.tensor([s.num_new_tokens for s in row_items], device=self.device)
                decode_tables = tables.repeat_interleave(per_item, dim=0)
            if not self.decode_kernel:  # the kernel stops at each context length: no mask
                key_pos = torch.arange(max_blocks * bs, device=self.device)
                decode_mask = (key_pos[None, :] < ctx[:, None]).view(nd, 1, 1, -1)

        chunks = []
        for item, start in zip(ordered[len(row_items):], starts[len(row_items):]):
            req, n = item.request, item.num_new_tokens
            context = req.num_computed_tokens + n
            if req.num_computed_tokens == 0:
                chunks.append(PrefillChunk(start, n, context, None, None))
            else:
                table = torch.tensor(req.block_ids[:self.kv.blocks_for(context)],
                                     dtype=torch.long, device=self.device)
                chunks.append(PrefillChunk(start, n, context, table,
                                           causal_mask(n, context, self.device)))

        sampled = [(item, start + item.num_new_tokens - 1)
                   for item, start in zip(ordered, starts) if item.samples]
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        meta = AttentionMetadata(as_long(slots), nd, decode_tables, decode_mask, chunks,
                                 decode_context_lens=ctx, decode_kernel=self.decode_kernel and nd > 0,
                                 store_kernel=self.decode_kernel)
        return StepInputs(as_long(ids), as_long(positions), meta, ordered, starts,
                          as_long([row for _, row in sampled]), [item for item, _ in sampled])

    @staticmethod
    def _context(item: ScheduledRequest) -> int:
        """Tokens the last new token of this step attends to."""
        return item.request.num_computed_tokens + item.num_new_tokens

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Runs the step; returns logits [S, vocab] of the sampling requests, in `inputs.sampled` order."""
        hook = self._export_hook(inputs)
        hidden = self.model.forward(inputs.input_ids, inputs.positions, self.kv.tensor,
                                    inputs.meta, hook)
        return self.model.logits(hidden[inputs.sample_rows])

    def _export_hook(self, inputs: StepInputs):
        """Per-layer callback handing each exporting request's new KV to its sink."""
        exports = []
        for item in inputs.ordered:
            req = item.request
            end = req.num_computed_tokens + item.num_new_tokens
            if req.kv_sink is not None and end > req.num_exported_tokens:
                exports.append((req, req.num_exported_tokens, end))
        if not exports:
            return None

        def hook(layer: int) -> None:
            for req, start, end in exports:
                req.kv_sink(req.request_id, layer, start, end,
                            self.kv.read_tokens(layer, req.block_ids, start, end))
            if layer == self.kv.num_layers - 1:
                for req, _, end in exports:
                    req.num_exported_tokens = end

        return hook
