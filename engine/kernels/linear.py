"""The engine's linear layers: y = x W^T + b, on whichever path is fastest for the weight.

A float32 CPU weight is packed once, at load, into column panels for the kernel of
packed_linear.cpp, and the plain copy is dropped: one copy serves every step, from batch-1
decode (memory-bound: it streams the panels at ~35 GB/s here, against ~10 for torch's
one-row matmul) to decode batches (compute-bound: ~210 GFLOP/s at 64 rows with the weights
coming from memory, against ~140 for MKL's sgemm and ~175 for oneDNN on its own packed layout)
and prefill chunks (on par with oneDNN). A row's result does not depend on the other rows of
its step, so a request computes the same bits in any batch.

A gated MLP's gate_up projection is a GatedLinear: packed as pairs of gate and up panels, its
kernel applies silu(gate) * up in the epilogue, so the [rows, 2 * intermediate] output is never
written out and read back (25 MB a layer in a 2048-token prefill step).

On a CPU with AMX (Intel Sapphire Rapids and later) the weight is packed instead for the tile
unit of amx_linear.cpp, which computes the float32 product from bfloat16 parts of x and W:
PDSERVE_FP32_MATMUL picks how (the names of PyTorch's and oneDNN's float32 math modes):
  auto    (default) bf16x3 where AMX runs, else ieee
  bf16x3  2 parts, 3 tile products a product: ~16 significand bits, as
          torch.set_float32_matmul_precision("high"); 1.3x the FMA kernel at 64 rows, 2x at 2048
  bf16x6  3 parts, 6 tile products: float32's 24 bits (errors of float32 rounding's size)
  ieee    the float32 FMA kernel of packed_linear.cpp, exact float32 products
On the default model the bf16x3 engine's greedy tokens were those of the torch-only float32
engine on all of the bench's 64 prompts x 128 tokens (2026-12-07), and the tests check every
math against HF transformers' tokens.
A machine without AMX takes ieee whatever the setting, with a warning if bf16x* was asked for.

Other devices and dtypes, `PDSERVE_LINEAR=torch`, and builds without the C++ kernels keep the
plain weight and `F.linear`.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops

log = logging.getLogger(__name__)

FP32_MATMUL_ENV = "PDSERVE_FP32_MATMUL"
FP32_MATMUL_MODES = ("auto", "ieee", "bf16x3", "bf16x6")
AMX_PARTS = {"bf16x3": 2, "bf16x6": 3}
_warned: set[str] = set()


def packing_enabled(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether weights of this device/dtype are packed for the C++ linear kernel (builds the
    kernels on the first call in a process)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    if os.environ.get("PDSERVE_LINEAR", "").strip().lower() == "torch":
        return False
    return cpu_ops.available()


def fp32_matmul_mode() -> str:
    """The float32 math of packed weights here: "ieee", "bf16x3" or "bf16x6" (PDSERVE_FP32_MATMUL,
    resolved against this machine; an unknown value is a ValueError naming the variable)."""
    asked = os.environ.get(FP32_MATMUL_ENV, "").strip().lower() or "auto"
    if asked not in FP32_MATMUL_MODES:
        raise ValueError(f"{FP32_MATMUL_ENV}={asked!r}: expected one of {', '.join(FP32_MATMUL_MODES)}")
    if asked == "ieee":
        return "ieee"
    if cpu_ops.amx_available():
        return "bf16x3" if asked == "auto" else asked
    if asked != "auto" and asked not in _warned:
        _warned.add(asked)
        log.warning("%s=%s needs a CPU with AMX and a kernel build for it; using ieee", FP32_MATMUL_ENV, asked)
    return "ieee"


def _pack(weight: torch.Tensor, pack_ieee, pack_amx) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    """(math, packed, plain weight) for a weight: packed by pack_ieee or pack_amx (with the
    math's number of parts), or kept plain for F.linear (math "torch")."""
    math = fp32_matmul_mode() if packing_enabled(weight.device, weight.dtype) else "torch"
    if math == "ieee":
        return math, pack_ieee(weight), None
    if math in AMX_PARTS:
        return math, pack_amx(weight, AMX_PARTS[math]), None
    return math, None, weight.contiguous()


def _itemsize(math: str, dtype: torch.dtype) -> int:
    """Bytes a weight value takes in the layout the math reads (2 per bf16 part)."""
    return 2 * AMX_PARTS[math] if math in AMX_PARTS else dtype.itemsize


class Linear:
    """y = x W^T + b for x [rows, in] -> [rows, out]; W [out, in] as loaded."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        # the plain weight is freed when packed, unless the caller holds it
        self.math, self.packed, self.weight = _pack(weight, cpu_ops.pack_linear_weight,
                                                    cpu_ops.pack_amx_weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.math == "ieee":
            return cpu_ops.packed_linear(x, self.packed, self.bias, self.out_features)
        if self.packed is not None:
            return cpu_ops.amx_linear(x, self.packed, self.bias, self.in_features, self.out_features)
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        """Bytes of weight one step reads (bf16x6: 3 bf16 parts, 6 bytes a float32 weight)."""
        return self.out_features * self.in_features * _itemsize(self.math, self.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2I] (gate then up) -> silu(gate) * up [rows, I]: the C++ pass for float32
    on CPU when the kernels are built, torch's ops otherwise."""
    if gate_up.device.type == "cpu" and gate_up.dtype == torch.float32 and cpu_ops.available():
        return cpu_ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class GatedLinear:
    """silu(x Wg^T) * (x Wu^T) for x [rows, in] -> [rows, I]; W [2I, in] = gate rows then up rows
    (a gated MLP's fused gate_up weight, as loaded)."""

    def __init__(self, weight: torch.Tensor):
        if weight.shape[0] % 2:
            raise ValueError(f"a gate_up weight needs an even number of rows, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape[0] // 2, weight.shape[1]
        self.dtype = weight.dtype
        self.math, self.packed, self.weight = _pack(weight, cpu_ops.pack_gated_weight,
                                                    cpu_ops.pack_amx_gated_weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.math == "ieee":
            return cpu_ops.gated_linear(x, self.packed, self.out_features)
        if self.packed is not None:
            return cpu_ops.amx_gated_linear(x, self.packed, self.in_features, self.out_features)
        return silu_mul(F.linear(x, self.weight))

    def nbytes(self) -> int:
        """Bytes of weight one step reads (gate and up)."""
        return 2 * self.out_features * self.in_features * _itemsize(self.math, self.dtype)
