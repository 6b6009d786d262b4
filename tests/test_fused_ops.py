"""The fused float32 layer ops of engine/kernels/fused_ops.cpp against torch references, and
the model's forward pass with them on and off."""
from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_ops
from engine.models.llama import apply_rope

pytestmark = pytest.mark.usefixtures("kernel")  # conftest: built once, else skipped


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("hidden", [576, 100])  # 100: not a multiple of the 16 lanes
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_torch(threads, rows, hidden, with_delta):
    gen = torch.Generator().manual_seed(rows * hidden)
    residual = torch.randn(rows, hidden, generator=gen) * 3
    delta = torch.randn(rows, hidden, generator=gen) if with_delta else None
    weight = torch.rand(hidden, generator=gen) + 0.5
    want_residual = residual.double() + (delta.double() if with_delta else 0)
    rms = want_residual.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
    want = want_residual * rms * weight.double()

    got = cpu_ops.add_rms_norm(residual, delta, weight, 1e-5)

    torch.testing.assert_close(residual.double(), want_residual, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_add_rms_norm_rejects_other_dtypes_and_shapes():
    with pytest.raises(RuntimeError, match="float32"):
        cpu_ops.add_rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), None,
                                  torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="delta"):
        cpu_ops.add_rms_norm(torch.ones(2, 8), torch.ones(3, 8), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        cpu_ops.add_rms_norm(torch.ones(2, 8), None, torch.ones(7), 1e-5)


@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("head_dim", [64, 10])
def test_rope_rotates_q_and_k_heads_in_place(threads, rows, head_dim):
    q_heads, kv_heads, max_pos = 3, 1, 50
    gen = torch.Generator().manual_seed(rows * head_dim)
    qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * head_dim, generator=gen)
    positions = torch.randint(0, max_pos, (rows,), generator=gen)
    angles = torch.rand(max_pos, head_dim // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    heads = q_heads + kv_heads
    rotated = apply_rope(qkv[:, :heads * head_dim].view(rows, heads, head_dim),
                         cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    v_before = qkv[:, heads * head_dim:].clone()

    cpu_ops.rope_(qkv, positions, cos, sin, heads, head_dim)

    torch.testing.assert_close(qkv[:, :heads * head_dim].view(rows, heads, head_dim), rotated,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, heads * head_dim:], v_before)  # V is left alone


def test_rope_on_strided_rows_and_bad_positions():
    base = torch.randn(4, 40)
    qkv = base[:, :24]  # rows 40 floats apart, 24 used
    before_tail = base[:, 24:].clone()
    cos, sin = torch.ones(8, 4), torch.zeros(8, 4)  # angle 0: identity
    expected = qkv.clone()
    cpu_ops.rope_(qkv, torch.tensor([0, 1, 2, 7]), cos, sin, 2, 8)
    assert torch.equal(qkv, expected) and torch.equal(base[:, 24:], before_tail)
    with pytest.raises(RuntimeError, match="position 8"):
        cpu_ops.rope_(qkv, torch.tensor([0, 1, 2, 8]), cos, sin, 2, 8)


@pytest.mark.parametrize("rows, inner", [(1, 1536), (7, 20), (64, 1536), (33, 17)])
def test_silu_mul_matches_float64(threads, rows, inner):
    gen = torch.Generator().manual_seed(rows * inner)
    gate_up = torch.randn(rows, 2 * inner, generator=gen) * 4
    gate_up[0, :4] = torch.tensor([-120.0, 95.0, -1e4, 1e4])  # the exp's clamps
    gate, up = gate_up.double().chunk(2, dim=-1)
    want = gate * torch.sigmoid(gate) * up

    got = cpu_ops.silu_mul(gate_up)

    assert got.shape == (rows, inner) and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_silu_mul_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="2 \\* I"):
        torch.ops.pdserve.silu_mul(torch.empty(2, 3), torch.ones(2, 7))
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.pdserve.silu_mul(torch.empty(2, 3), torch.ones(2, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_rows_like_index_copy(threads, dtype):
    blocks, block_size, kv_heads, head_dim, heads = 6, 4, 2, 8, 4
    gen = torch.Generator().manual_seed(7)
    kv_layer = torch.randn(2, blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    want = kv_layer.clone()
    # k and v as the model has them: views into a fused QKV output (rows strided)
    qkv = torch.randn(5, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    _, k, v = (t.view(5, -1, head_dim) for t in qkv.split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    slots = torch.tensor([3, 0, 23, 9, 10])
    flat = want.view(2, blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)

    cpu_ops.store_kv(kv_layer, slots, k, v)

    assert torch.equal(kv_layer, want)


def test_store_kv_refuses_a_slot_outside_the_cache():
    kv_layer = torch.zeros(2, 2, 4, 1, 8)
    k = v = torch.ones(2, 1, 8)
    with pytest.raises(RuntimeError, match="slot 8 outside"):
        cpu_ops.store_kv(kv_layer, torch.tensor([1, 8]), k, v)
    assert not kv_layer.any()  # checked before anything is written


@pytest.mark.parametrize("rows, vocab", [(1, 49152), (64, 49152), (5, 37), (3, 1)])
def test_argmax_rows_matches_torch_argmax(threads, rows, vocab):
    gen = torch.Generator().manual_seed(rows + vocab)
    x = torch.randn(rows, vocab, generator=gen)
    if vocab > 20:
        x[0, 3] = x[0, vocab - 2] = 50.0  # a tie: the first index wins
        x[-1, -1] = 60.0  # the maximum in the tail past the last 16 lanes
    assert torch.equal(cpu_ops.argmax_rows(x), x.argmax(dim=-1))


def test_argmax_rows_edge_values_and_strided_rows():
    x = torch.randn(6, 40)
    x[0] = -float("inf")  # all -inf: index 0
    x[1, 7] = float("nan")
    x[1, 9] = float("inf")  # a NaN beats +inf
    x[2, 35] = float("nan")  # a NaN in the tail
    x[3, :] = 0.0
    x[3, 5] = -0.0  # equal to 0.0: the first zero wins
    x[4, 20] = float("inf")
    assert torch.equal(cpu_ops.argmax_rows(x), x.argmax(dim=-1))
    wide = torch.randn(4, 100)
    view = wide[:, 10:60]  # rows 100 floats apart
    assert torch.equal(cpu_ops.argmax_rows(view), view.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="float32 CPU"):
        cpu_ops.argmax_rows(torch.randn(4, 6).t())
    with pytest.raises(RuntimeError, match="float32 CPU"):
        cpu_ops.argmax_rows(torch.randn(4, 0))


def test_model_forward_same_with_fused_ops_on_and_off(make_engine):
    """Final hidden states of a mixed step (prefill + decode) agree between the C++ and the
    torch versions of the small ops, and greedy tokens are the same."""
    from engine.sampling_params import SamplingParams

    engine = make_engine()
    model = engine.model
    assert model.fused, "float32 on CPU with the kernels built should use the fused ops"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "1, 2, 3, 4, 5,", "Once upon a time there was"]
    fused_tokens = [o.token_ids for o in engine.generate(prompts, params)]
    hidden_fused = _last_hidden(engine)
    model.fused = False
    try:
        torch_tokens = [o.token_ids for o in engine.generate(prompts, params)]
        hidden_torch = _last_hidden(engine)
    finally:
        model.fused = True
    assert fused_tokens == torch_tokens
    torch.testing.assert_close(hidden_fused, hidden_torch, rtol=1e-4, atol=1e-4)


def _last_hidden(engine) -> torch.Tensor:
    """Final hidden states of one prefill forward of a fixed prompt, outside the scheduler."""
    from engine.attention import AttentionMetadata, PrefillChunk

    ids = torch.tensor(engine.tokenizer.encode("A quick test of the forward pass"))
    n = ids.shape[0]
    scratch = torch.zeros_like(engine.kv.tensor[:, :, :, :engine.kv.blocks_for(n)])
    meta = AttentionMetadata(slot_mapping=torch.arange(n), num_decode=0, decode_block_tables=None,
                             decode_mask=None, prefills=[PrefillChunk(0, n, n, None, None)])
    return engine.model.forward(ids, torch.arange(n), scratch, meta)
