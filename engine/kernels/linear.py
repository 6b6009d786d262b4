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

Other devices and dtypes, `PDSERVE_LINEAR=torch`, and builds without the C++ kernels keep the
plain weight and `F.linear`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops


def packing_enabled(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether weights of this device/dtype are packed for the C++ linear kernel (builds the
    kernels on the first call in a process)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    if os.environ.get("PDSERVE_LINEAR", "").strip().lower() == "torch":
        return False
    return cpu_ops.available()


class Linear:
    """y = x W^T + b for x [rows, in] -> [rows, out]; W [out, in] as loaded."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        if packing_enabled(weight.device, weight.dtype):
            self.packed: torch.Tensor | None = cpu_ops.pack_linear_weight(weight)
            self.weight: torch.Tensor | None = None  # freed, unless the caller holds it
        else:
            self.packed, self.weight = None, weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return cpu_ops.packed_linear(x, self.packed, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        """Bytes of weight one step reads."""
        return self.out_features * self.in_features * self.dtype.itemsize


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
        if packing_enabled(weight.device, weight.dtype):
            self.packed: torch.Tensor | None = cpu_ops.pack_gated_weight(weight)
            self.weight: torch.Tensor | None = None
        else:
            self.packed, self.weight = None, weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return cpu_ops.gated_linear(x, self.packed, self.out_features)
        return silu_mul(F.linear(x, self.weight))

    def nbytes(self) -> int:
        """Bytes of weight one step reads (gate and up)."""
        return 2 * self.out_features * self.in_features * self.dtype.itemsize
