"""The engine's linear layers: each picks, per call, the fastest path for its input's row count.

On CPU, torch's `F.linear` runs MKL sgemm on a plain [out, in] weight. On this AMD EPYC that
reaches ~140 GFLOP/s on a decode batch of 64 rows and ~85 GFLOP/s on the LM head; oneDNN on a
weight reordered once, at load, into its own blocked layout reaches ~195-215 GFLOP/s on both
(2 threads, each layer shape of the default model timed alone). So a `Linear` keeps:

- `packed`: the weight reordered for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`, the
  op torch's inductor uses when it freezes a CPU model) for steps of more than one row;
- `weight`: the plain weight, for single-row steps, where the gemv kernel of gemv.cpp streams
  it faster than either library (batch-1 decode is bound by memory bandwidth, not FLOPs).

Keeping both doubles the weight memory of a float32 CPU model (538 MB more for the default
model); `PDSERVE_LINEAR=torch` keeps only the plain weight and uses `F.linear` (plus the gemv
kernel unless PDSERVE_ATTENTION=sdpa). Packing is tried once per dtype with a probe against
`F.linear`; any failure logs one warning and the plain path is used.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.float32,)
# oneDNN picks its blocked layout for a row count; 64 (the default decode batch) also ran
# prefill chunks and small batches faster than the layout for 1 row (a whole model's linears,
# 1 to 512 rows, timed here with each hint).
PACK_ROWS_HINT = 64

_packing_ok: dict[torch.dtype, bool] = {}


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether weights of this device/dtype are packed for oneDNN (probed once per dtype)."""
    if torch.device(device).type != "cpu" or dtype not in PACKED_DTYPES:
        return False
    if os.environ.get("PDSERVE_LINEAR", "").strip().lower() == "torch":
        return False
    if dtype not in _packing_ok:
        _packing_ok[dtype] = _probe(dtype)
    return _packing_ok[dtype]


def _probe(dtype: torch.dtype) -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("torch was built without oneDNN")
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(40, 24, generator=gen).to(dtype)
        bias = torch.randn(40, generator=gen).to(dtype)
        packed = _pack(weight)
        for rows in (1, 5, 70):
            x = torch.randn(rows, 24, generator=gen).to(dtype)
            got = _packed_linear(x, packed, bias)
            if not torch.allclose(got, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"packed linear disagrees with F.linear at {rows} rows")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: keep F.linear
        log.warning("oneDNN weight packing unavailable for %s, using F.linear (%s: %s)",
                    dtype, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        return False


class Linear:
    """y = x W^T + b for x [rows, in] -> [rows, out]; W [out, in] as loaded."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.contiguous()
        self.bias = bias
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        self.gemv = cpu_fp32 and cpu_ops.available()
        self.packed = _pack(self.weight) if packing_available(weight.device, weight.dtype) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv and x.shape[0] == 1:
            return cpu_ops.linear(x, self.weight, self.bias)
        if self.packed is not None:
            return _packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def nbytes(self) -> int:
        """Bytes one step reads (the weight once, whichever copy the step uses)."""
        return self.weight.numel() * self.weight.element_size()
