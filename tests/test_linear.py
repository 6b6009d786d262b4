"""engine.kernels.linear: every path of Linear computes F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import linear as linear_mod
from engine.kernels.linear import Linear, packing_available


def _reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


@pytest.mark.parametrize("rows", [1, 2, 63, 64, 65, 700])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float64_reference(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 96, generator=gen)
    bias = torch.randn(200, generator=gen) if with_bias else None
    x = torch.randn(rows, 96, generator=gen)
    got = Linear(weight, bias)(x)
    assert got.shape == (rows, 200) and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(x, weight, bias), rtol=1e-4, atol=1e-4)


def test_float32_cpu_weights_are_packed_for_onednn():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    layer = Linear(torch.randn(32, 16))
    assert layer.packed is not None and layer.packed.is_mkldnn
    assert layer.nbytes() == 32 * 16 * 4  # one step reads one copy


def test_other_dtypes_keep_plain_weights():
    layer = Linear(torch.randn(32, 16, dtype=torch.bfloat16))
    assert layer.packed is None and not layer.gemv
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_env_switch_turns_packing_off(monkeypatch):
    monkeypatch.setenv("PDSERVE_LINEAR", "torch")
    assert not packing_available("cpu", torch.float32)
    layer = Linear(torch.randn(8, 4))
    assert layer.packed is None
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_a_failing_probe_falls_back_to_f_linear(monkeypatch, caplog):
    def broken(weight):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(linear_mod, "_pack", broken)
    monkeypatch.setattr(linear_mod, "_packing_ok", {})
    with caplog.at_level("WARNING"):
        layer = Linear(torch.randn(8, 4))
    assert layer.packed is None
    assert "oneDNN weight packing unavailable" in caplog.text
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
