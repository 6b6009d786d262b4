"""Llama-family decoder (Llama, Mistral, Qwen2) over a flat token batch with a paged KV cache.

Weights are fused at load time so a layer is four matmuls: QKV, output, gate+up (with
silu(gate) * up) and down; then, once per step, the LM head over only the rows that are
sampled. Each is an engine.kernels.linear.Linear (the gate+up a GatedLinear), which packs
float32 CPU weights for the C++ kernel.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelConfig
from engine.kernels import cpu_ops
from engine.kernels.linear import GatedLinear, Linear

LayerHook = Callable[[int], None]  # called with the layer index once its K/V is in the cache


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.rope_scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
    factor, low_freq_factor, high_freq_factor, original_max_pos = config.rope_scaling
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_pos / low_freq_factor
    high_freq_wavelen = original_max_pos / high_freq_factor
    smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, 1, D/2]. Rotates the two halves (the HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaLayer:
    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, has_bias: bool):
        w = lambda name: weights[prefix + name]  # noqa: E731
        qkv_bias = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"),
                              w("self_attn.v_proj.bias")]) if has_bias else None
        self.qkv = Linear(torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"),
                                     w("self_attn.v_proj.weight")]), qkv_bias)
        self.o_proj = Linear(w("self_attn.o_proj.weight"))
        self.gate_up = GatedLinear(torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]))
        self.down = Linear(w("mlp.down_proj.weight"))
        self.input_norm = w("input_layernorm.weight")
        self.post_norm = w("post_attention_layernorm.weight")


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype):
        self.config = config
        weights = {name: t.to(device=device, dtype=dtype) for name, t in weights.items()}
        self.embed = weights["model.embed_tokens.weight"]
        self.lm_head = Linear(self.embed if config.tie_word_embeddings else weights["lm_head.weight"])
        self.norm = weights["model.norm.weight"]
        self.layers = [LlamaLayer(weights, f"model.layers.{i}.", config.attention_bias)
                       for i in range(config.num_layers)]
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float64)
        angles = torch.outer(positions, rope_inv_freq(config))  # [max_pos, D/2]
        self.cos = angles.cos().to(device=device, dtype=torch.float32)
        self.sin = angles.sin().to(device=device, dtype=torch.float32)
        # float32 on CPU: residual add + RMSNorm and RoPE as one C++ op each (fused_ops.cpp).
        self.fused = (torch.device(device).type == "cpu" and dtype == torch.float32
                      and cpu_ops.available())

    def weight_bytes(self) -> int:
        """Bytes of weights read by one forward step (the LM head once, even when tied)."""
        norms = [self.norm] + [n for layer in self.layers for n in (layer.input_norm, layer.post_norm)]
        linears = [self.lm_head] + [lin for layer in self.layers
                                    for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
        return sum(t.numel() * t.element_size() for t in norms) + sum(lin.nbytes() for lin in linears)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, layer_hook: LayerHook | None = None) -> torch.Tensor:
        """input_ids/positions [T] -> final hidden states [T, hidden]."""
        cfg = self.config
        ops = (_FusedOps if self.fused else _TorchOps)(self, positions)
        num_tokens = input_ids.shape[0]
        hidden = self.embed[input_ids]  # [T, hidden]: a copy, the residual stream, added to in place
        x = ops.add_norm(hidden, None, self.layers[0].input_norm)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x)  # [T, (H + 2 * KV) * D]
            ops.rope_(qkv)
            q, k, v = (t.view(num_tokens, -1, cfg.head_dim)  # [T, heads, D] each
                       for t in qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1))
            attn = paged_attention(q, k, v, kv_cache[i], meta, self.scale)
            if layer_hook is not None:
                layer_hook(i)
            x = ops.add_norm(hidden, layer.o_proj(attn.view(num_tokens, self.q_size)), layer.post_norm)
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            x = ops.add_norm(hidden, layer.down(layer.gate_up(x)), next_norm)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()


class _TorchOps:
    """The layer's small ops in torch: residual add + RMSNorm and RoPE (any device and dtype)."""

    def __init__(self, model: LlamaModel, positions: torch.Tensor):
        cfg = model.config
        self.eps, self.hidden_size = cfg.rms_norm_eps, cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads + cfg.num_kv_heads, cfg.head_dim
        dtype = model.embed.dtype
        self.cos = model.cos[positions].unsqueeze(1).to(dtype)  # [T, 1, D/2]
        self.sin = model.sin[positions].unsqueeze(1).to(dtype)

    def add_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None,
                 weight: torch.Tensor) -> torch.Tensor:
        """hidden += delta (in place); returns RMSNorm(hidden) * weight."""
        if delta is not None:
            hidden.add_(delta)
        return F.rms_norm(hidden, (self.hidden_size,), weight, self.eps)

    def rope_(self, qkv: torch.Tensor) -> None:
        """Rotates the Q and K heads of qkv [T, (H + 2 * KV) * D] in place."""
        qk = qkv[:, :self.heads * self.head_dim].view(qkv.shape[0], self.heads, self.head_dim)
        qk.copy_(apply_rope(qk, self.cos, self.sin))


class _FusedOps:
    """The same ops as _TorchOps, one C++ call each (float32 on CPU)."""

    def __init__(self, model: LlamaModel, positions: torch.Tensor):
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.heads, self.head_dim = cfg.num_heads + cfg.num_kv_heads, cfg.head_dim
        self.positions, self.cos, self.sin = positions, model.cos, model.sin

    def add_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None,
                 weight: torch.Tensor) -> torch.Tensor:
        return cpu_ops.add_rms_norm(hidden, delta, weight, self.eps)

    def rope_(self, qkv: torch.Tensor) -> None:
        cpu_ops.rope_(qkv, self.positions, self.cos, self.sin, self.heads, self.head_dim)
