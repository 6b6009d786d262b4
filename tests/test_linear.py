"""engine.kernels.linear and the packed linear kernels (packed_linear.cpp): every path computes
F.linear (GatedLinear: silu(gate) * up of it), and the packed one gives a row the same bits
whatever else is in its batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.kernels import linear as linear_mod
from engine.kernels.linear import GatedLinear, Linear, packing_enabled


def _reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


def _random(*shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


# 200 and 49 outputs: a partial last panel of columns; 1600 inputs: three K blocks; 96: one
@pytest.mark.parametrize("out_features, in_features", [(200, 96), (49, 1600), (1, 7)])
@pytest.mark.parametrize("rows", [1, 3, 8, 63, 64, 65, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64_reference(kernel, threads, out_features, in_features,
                                                 rows, with_bias):
    weight, bias, x = _random((out_features, in_features), (out_features,), (rows, in_features),
                              seed=rows * 31 + out_features)
    layer = Linear(weight, bias if with_bias else None)
    assert layer.packed is not None and layer.weight is None  # one copy: the packed one
    got = layer(x)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(x, weight, bias if with_bias else None),
                               rtol=1e-4, atol=1e-4)


def test_a_row_has_the_same_bits_in_any_batch_and_thread_count(kernel):
    weight, bias, x = _random((130, 900), (130,), (150, 900), seed=1)
    layer = Linear(weight, bias)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = layer(x)
        for rows in (1, 5, 8, 64, 149):  # every tile and chunk shape the rows can fall in
            assert torch.equal(layer(x[:rows]), full[:rows]), rows
        torch.set_num_threads(1)
        assert torch.equal(layer(x), full)
    finally:
        torch.set_num_threads(before)


def test_strided_and_empty_inputs(kernel):
    weight, wide = _random((40, 30), (6, 70), seed=2)
    layer = Linear(weight)
    x = wide[:, 5:35]  # rows 70 floats apart
    assert x.stride() == (70, 1)
    assert torch.equal(layer(x), layer(x.contiguous()))
    assert layer(torch.empty(0, 30)).shape == (0, 40)


def test_bad_shapes_are_refused(kernel):
    weight, x = _random((40, 30), (2, 31), seed=3)
    packed = cpu_ops.pack_linear_weight(weight)
    with pytest.raises(RuntimeError, match="x has 31 features, the weight 30"):
        cpu_ops.packed_linear(x, packed, None, 40)
    with pytest.raises(RuntimeError, match="output features do not match"):
        cpu_ops.packed_linear(x[:, :30], packed, None, 400)
    with pytest.raises(RuntimeError, match="must come from pack_linear_weight"):
        cpu_ops.packed_linear(x[:, :30], weight, None, 40)
    with pytest.raises(RuntimeError, match="bias must be float32 with 40 values"):
        cpu_ops.packed_linear(x[:, :30], packed, torch.zeros(39), 40)


def test_other_dtypes_keep_plain_weights():
    layer = Linear(torch.randn(32, 16, dtype=torch.bfloat16))
    assert layer.packed is None
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    assert layer.nbytes() == 32 * 16 * 2


def test_env_switch_turns_packing_off(monkeypatch):
    monkeypatch.setenv("PDSERVE_LINEAR", "torch")
    assert not packing_enabled("cpu", torch.float32)
    layer = Linear(torch.randn(8, 4))
    assert layer.packed is None
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_without_the_kernels_f_linear_is_used(monkeypatch):
    monkeypatch.setattr(linear_mod.cpu_ops, "available", lambda: False)
    weight, bias, x = _random((8, 4), (8,), (5, 4), seed=4)
    layer = Linear(weight, bias)
    assert layer.packed is None
    assert torch.equal(layer(x), F.linear(x, weight, bias))
    assert layer.nbytes() == 8 * 4 * 4


def _gated_reference(x, weight):
    gate, up = F.linear(x.double(), weight.double()).chunk(2, dim=-1)
    return (F.silu(gate) * up).float()


# 100 outputs: a partial last panel pair; 1600 inputs: three K blocks (partial sums in scratch)
@pytest.mark.parametrize("inner, in_features", [(100, 96), (49, 1600), (1, 7)])
@pytest.mark.parametrize("rows", [1, 8, 63, 65, 200])
def test_gated_linear_matches_float64_reference(kernel, threads, inner, in_features, rows):
    weight, x = _random((2 * inner, in_features), (rows, in_features), seed=rows * 7 + inner)
    weight *= in_features ** -0.5  # sums of order 1, as in a model: float32's error stays ~1e-6
    layer = GatedLinear(weight)
    assert layer.packed is not None and layer.weight is None
    got = layer(x)
    assert got.shape == (rows, inner) and got.dtype == torch.float32
    torch.testing.assert_close(got, _gated_reference(x, weight), rtol=1e-4, atol=1e-4)


def test_gated_linear_has_the_bits_of_the_unfused_path_in_any_batch(kernel):
    weight, x = _random((2 * 130, 900), (150, 900), seed=5)
    x[0, :4] = torch.tensor([300.0, -300.0, 1e4, -1e4])  # gate sums past exp's clamps
    layer = GatedLinear(weight)
    unfused = cpu_ops.silu_mul(cpu_ops.packed_linear(x, cpu_ops.pack_linear_weight(weight), None, 260))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(layer(x), unfused)
            for rows in (1, 5, 64, 149):
                assert torch.equal(layer(x[:rows]), unfused[:rows]), rows
    finally:
        torch.set_num_threads(before)


def test_gated_linear_strided_empty_and_bad_inputs(kernel):
    weight, wide = _random((2 * 20, 30), (6, 70), seed=6)
    layer = GatedLinear(weight)
    x = wide[:, 5:35]
    assert torch.equal(layer(x), layer(x.contiguous()))
    assert layer(torch.empty(0, 30)).shape == (0, 20)
    with pytest.raises(RuntimeError, match="x has 31 features, the weight 30"):
        cpu_ops.gated_linear(wide[:, :31], layer.packed, 20)
    with pytest.raises(RuntimeError, match="output features do not match"):
        cpu_ops.gated_linear(x, layer.packed, 200)
    with pytest.raises(RuntimeError, match="must come from pack_gated_weight"):
        cpu_ops.gated_linear(x, cpu_ops.pack_linear_weight(weight)[:1], 20)
    with pytest.raises(RuntimeError, match="not gate and up halves"):
        cpu_ops.pack_gated_weight(weight[:39])
    with pytest.raises(ValueError, match="even number of rows"):
        GatedLinear(weight[:39])


def test_gated_linear_without_packing_uses_f_linear_and_silu(monkeypatch):
    monkeypatch.setenv("PDSERVE_LINEAR", "torch")
    weight, x = _random((2 * 12, 8), (5, 8), seed=7)
    layer = GatedLinear(weight)
    assert layer.packed is None and layer.nbytes() == 2 * 12 * 8 * 4
    torch.testing.assert_close(layer(x), _gated_reference(x, weight), rtol=1e-5, atol=1e-5)
    bf16 = GatedLinear(weight.bfloat16())  # torch's silu and mul
    assert bf16.packed is None
    torch.testing.assert_close(bf16(x.bfloat16()).float(), _gated_reference(x, weight),
                               rtol=5e-2, atol=5e-2)
