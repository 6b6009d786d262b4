"""Llama-family decoder (Llama, Mistral, Qwen2) over a flat token batch with a paged KV cache.

Weights are fused at load time so a layer is five matmuls: QKV, output, gate+up,
down, and (once per step) the LM head over only the rows that are sampled.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelConfig
from engine.kernels import paged_decode

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
        self.qkv = torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"),
                              w("self_attn.v_proj.weight")])
        self.qkv_bias = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"),
                                   w("self_attn.v_proj.bias")]) if has_bias else None
        self.o_proj = w("self_attn.o_proj.weight")
        self.gate_up = torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")])
        self.down = w("mlp.down_proj.weight")
        self.input_norm = w("input_layernorm.weight")
        self.post_norm = w("post_attention_layernorm.weight")


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype):
        self.config = config
        weights = {name: t.to(device=device, dtype=dtype) for name, t in weights.items()}
        self.embed = weights["model.embed_tokens.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
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
        # Batch-1 steps stream every weight once: on CPU in float32 the gemv kernel does that
        # 2-4x faster than torch's matmul (engine/kernels/gemv.cpp); else plain F.linear.
        self.linear = (paged_decode.linear if torch.device(device).type == "cpu"
                       and dtype == torch.float32 and paged_decode.available() else F.linear)

    def weight_bytes(self) -> int:
        """Bytes of weights read by one forward step (the LM head once, even when tied)."""
        tensors = [self.lm_head, self.norm]
        for layer in self.layers:
            tensors += [layer.qkv, layer.o_proj, layer.gate_up, layer.down, layer.input_norm,
                        layer.post_norm]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, layer_hook: LayerHook | None = None) -> torch.Tensor:
        """input_ids/positions [T] -> final hidden states [T, hidden]."""
        cfg = self.config
        eps = cfg.rms_norm_eps
        hidden = self.embed[input_ids]  # [T, hidden]
        cos = self.cos[positions].unsqueeze(1).to(hidden.dtype)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1).to(hidden.dtype)
        num_tokens = input_ids.shape[0]
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(hidden, (cfg.hidden_size,), layer.input_norm, eps)
            qkv = self.linear(x, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(num_tokens, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rope(k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            attn = paged_attention(q, k, v, kv_cache[i], meta, self.scale)
            if layer_hook is not None:
                layer_hook(i)
            hidden = hidden + self.linear(attn.view(num_tokens, self.q_size), layer.o_proj)
            x = F.rms_norm(hidden, (cfg.hidden_size,), layer.post_norm, eps)
            gate, up = self.linear(x, layer.gate_up).chunk(2, dim=-1)
            hidden = hidden + self.linear(F.silu(gate) * up, layer.down)
        return F.rms_norm(hidden, (cfg.hidden_size,), self.norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        return self.linear(hidden, self.lm_head).float()
