"""engine.kernels.linear and the packed linear kernels (packed_linear.cpp, and amx_linear.cpp where
the CPU has AMX): every path computes F.linear (GatedLinear: silu(gate) * up of it) within its
float32 math's error, and the packed ones give a row the same bits whatever else is in its batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.kernels import linear as linear_mod
from engine.kernels.linear import GatedLinear, Linear, fp32_matmul_mode, packing_enabled

# Error bound per unit of sum_k |x_k| |w_k|: float32 rounding (ieee, and bf16x6's three parts hold
# float32's 24 bits) far below 2^-18; bf16x3 drops x1 w1 (<= 2^-16 |x w|) and what the two parts
# leave of x and w (<= 2^-17 each): 2^-15.
ERROR_PER_ABS_SUM = {"ieee": 2.0 ** -18, "bf16x6": 2.0 ** -18, "bf16x3": 2.0 ** -15}


@pytest.fixture(params=["ieee", "bf16x3", "bf16x6"])
def math(request, kernel, monkeypatch):
    """Runs the test for each float32 math of packed weights (PDSERVE_FP32_MATMUL); the AMX ones
    only on a CPU with AMX."""
    if request.param != "ieee" and not cpu_ops.amx_available():
        pytest.skip("no AMX on this CPU (or in this kernel build)")
    monkeypatch.setenv("PDSERVE_FP32_MATMUL", request.param)
    return request.param


def _reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


def _error_bound(x, weight, math):
    """[rows, out] float64: what the math may be off by, per output."""
    return ERROR_PER_ABS_SUM[math] * (x.double().abs() @ weight.double().abs().T) + 1e-6


def _assert_near(got, want, bound):
    err = (got.double() - want.double()).abs()
    assert bool((err <= bound).all()), f"error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()].item():.3g}"


def _random(*shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


# 200 and 49 outputs: a partial last panel of columns; 1600 inputs: three K blocks; 96: one
@pytest.mark.parametrize("out_features, in_features", [(200, 96), (49, 1600), (1, 7)])
@pytest.mark.parametrize("rows", [1, 3, 8, 63, 64, 65, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64_reference(math, threads, out_features, in_features,
                                                 rows, with_bias):
    weight, bias, x = _random((out_features, in_features), (out_features,), (rows, in_features),
                              seed=rows * 31 + out_features)
    layer = Linear(weight, bias if with_bias else None)
    assert layer.math == math
    assert layer.packed is not None and layer.weight is None  # one copy: the packed one
    got = layer(x)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    _assert_near(got, _reference(x, weight, bias if with_bias else None), _error_bound(x, weight, math))


def test_three_bf16_parts_are_more_accurate_than_two(kernel):
    if not cpu_ops.amx_available():
        pytest.skip("no AMX on this CPU (or in this kernel build)")
    weight, x = _random((64, 576), (40, 576), seed=11)
    want = _reference(x, weight, None).double()
    err = {parts: (cpu_ops.amx_linear(x, cpu_ops.pack_amx_weight(weight, parts), None, 576, 64).double()
                   - want).abs().max().item() for parts in (2, 3)}
    err["ieee"] = (cpu_ops.packed_linear(x, cpu_ops.pack_linear_weight(weight), None, 64).double()
                   - want).abs().max().item()
    # three parts: float32's rounding in the sums is all that is left, as for the FMA kernel
    assert 0 < err[3] * 4 < err[2] and err[3] < 4 * err["ieee"], err


def test_a_row_has_the_same_bits_in_any_batch_and_thread_count(math):
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


def test_strided_and_empty_inputs(math):
    weight, wide, bias = _random((40, 30), (6, 70), (5,), seed=2)
    layer = Linear(weight)
    x = wide[:, 5:35]  # rows 70 floats apart
    assert x.stride() == (70, 1)
    assert torch.equal(layer(x), layer(x.contiguous()))
    assert layer(torch.empty(0, 30)).shape == (0, 40)
    # no inputs: the bias alone (silu(0) * 0 = 0 for the gated form)
    assert torch.equal(Linear(torch.empty(5, 0), bias)(torch.empty(3, 0)), bias.expand(3, 5))
    assert torch.equal(GatedLinear(torch.empty(10, 0))(torch.empty(3, 0)), torch.zeros(3, 5))


def test_values_near_float32_max_stay_finite(math):
    """A weight that rounds up to bf16 inf (|w| > ~3.39e38) is split by truncation instead."""
    weight = torch.full((3, 40), 3.4e38)
    weight[1] = -3.4e38
    weight[2] = 1.0
    x = torch.zeros(2, 40)
    x[:, 7] = 0.5
    got = Linear(weight)(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(x, weight, None), rtol=1e-4, atol=0)
    x[1, 8] = 1e38  # and an x value of that size next to it
    torch.testing.assert_close(Linear(weight)(x)[:, 2], _reference(x, weight, None)[:, 2], rtol=1e-4, atol=0)


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


def test_bad_shapes_are_refused_by_the_amx_kernel(kernel):
    if not cpu_ops.amx_available():
        pytest.skip("no AMX on this CPU (or in this kernel build)")
    weight, x = _random((40, 30), (2, 70), seed=3)
    packed = cpu_ops.pack_amx_weight(weight, 2)
    with pytest.raises(RuntimeError, match="x has 70 features, the weight 30"):
        cpu_ops.amx_linear(x, packed, None, 30, 40)
    with pytest.raises(RuntimeError, match="x has 31 features, the weight 30"):
        cpu_ops.amx_linear(x[:, :31], packed, None, 30, 40)  # the same 32-wide step: still refused
    with pytest.raises(RuntimeError, match="in_features 70 do not match the packed weight's 1 steps"):
        cpu_ops.amx_linear(x, packed, None, 70, 40)
    with pytest.raises(RuntimeError, match="output features do not match"):
        cpu_ops.amx_linear(x[:, :30], packed, None, 30, 400)
    with pytest.raises(RuntimeError, match="must come from pack_amx_weight"):
        cpu_ops.amx_linear(x[:, :30], cpu_ops.pack_linear_weight(weight), None, 30, 40)
    with pytest.raises(RuntimeError, match="bias must be float32 with 40 values"):
        cpu_ops.amx_linear(x[:, :30], packed, torch.zeros(39), 30, 40)
    with pytest.raises(RuntimeError, match="x has 31 features, the weight 30"):
        cpu_ops.amx_gated_linear(x[:, :31], cpu_ops.pack_amx_gated_weight(weight, 3), 30, 20)
    with pytest.raises(RuntimeError, match="parts must be 2 .bf16x3. or 3 .bf16x6., got 4"):
        cpu_ops.pack_amx_weight(weight, 4)
    with pytest.raises(RuntimeError, match="not gate and up halves"):
        cpu_ops.pack_amx_gated_weight(weight[:39], 2)


def test_fp32_matmul_setting(kernel, monkeypatch, caplog):
    monkeypatch.setenv("PDSERVE_FP32_MATMUL", "fast")
    with pytest.raises(ValueError, match="PDSERVE_FP32_MATMUL='fast': expected one of auto, ieee"):
        Linear(torch.randn(8, 4))
    monkeypatch.setenv("PDSERVE_FP32_MATMUL", "ieee")
    assert fp32_matmul_mode() == "ieee" and Linear(torch.randn(8, 4)).packed.dtype == torch.float32
    monkeypatch.setenv("PDSERVE_FP32_MATMUL", "auto")
    assert fp32_matmul_mode() == ("bf16x3" if cpu_ops.amx_available() else "ieee")
    # without AMX an explicit bf16x6 falls back to ieee, and says so
    monkeypatch.setattr(linear_mod.cpu_ops, "amx_available", lambda: False)
    monkeypatch.setattr(linear_mod, "_warned", set())
    monkeypatch.setenv("PDSERVE_FP32_MATMUL", "bf16x6")
    with caplog.at_level("WARNING", logger="engine.kernels.linear"):
        layer = Linear(torch.randn(8, 4))
    assert layer.math == "ieee" and "PDSERVE_FP32_MATMUL=bf16x6 needs a CPU with AMX" in caplog.text


def test_amx_weights_read_two_bytes_a_part(kernel, monkeypatch):
    if not cpu_ops.amx_available():
        pytest.skip("no AMX on this CPU (or in this kernel build)")
    for math, parts in (("bf16x3", 2), ("bf16x6", 3)):
        monkeypatch.setenv("PDSERVE_FP32_MATMUL", math)
        layer, gated = Linear(torch.randn(40, 30)), GatedLinear(torch.randn(2 * 20, 30))
        assert layer.packed.dtype == gated.packed.dtype == torch.bfloat16
        assert layer.nbytes() == 40 * 30 * 2 * parts and gated.nbytes() == 2 * 20 * 30 * 2 * parts


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
def test_gated_linear_matches_float64_reference(math, threads, inner, in_features, rows):
    weight, x = _random((2 * inner, in_features), (rows, in_features), seed=rows * 7 + inner)
    weight *= in_features ** -0.5  # sums of order 1, as in a model: float32's error stays ~1e-6
    layer = GatedLinear(weight)
    assert layer.math == math
    assert layer.packed is not None and layer.weight is None
    got = layer(x)
    assert got.shape == (rows, inner) and got.dtype == torch.float32
    # silu(g) * u moves by at most 1.1 |u| dg + |silu(g)| du
    gate, up = F.linear(x.double(), weight.double()).chunk(2, dim=-1)
    d_gate, d_up = _error_bound(x, weight, math).chunk(2, dim=-1)
    _assert_near(got, _gated_reference(x, weight), 1.1 * up.abs() * d_gate + F.silu(gate).abs() * d_up + 1e-6)


def test_gated_linear_has_the_bits_of_the_unfused_path_in_any_batch(math):
    weight, x = _random((2 * 130, 900), (150, 900), seed=5)
    x[0, :4] = torch.tensor([300.0, -300.0, 1e4, -1e4])  # gate sums past exp's clamps
    layer = GatedLinear(weight)
    unfused = cpu_ops.silu_mul(Linear(weight)(x))  # the same math, its own panels
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(layer(x), unfused)
            for rows in (1, 5, 64, 149):
                assert torch.equal(layer(x[:rows]), unfused[:rows]), rows
    finally:
        torch.set_num_threads(before)


def test_gated_linear_strided_empty_and_bad_inputs(kernel, monkeypatch):
    monkeypatch.setenv("PDSERVE_FP32_MATMUL", "ieee")  # the FMA kernel's checks
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
