"""The engine's linear layers: y = x W^T + b, on whichever path is fastest for the weight.

A float32 CPU weight is packed once, at load, into column panels for the kernel of
packed_linear.cpp, and the plain copy is dropped: one copy serves every step, from batch-1
decode (memory-bound: it streams the panels at ~35 GB/s here, against ~10 for torch's
one-row matmul) to decode batches (compute-bound: ~210 GFLOP/s at 64 rows with the weights
coming from memory, against ~140 for MKL's sgemm and ~175 for oneDNN on its own packed layout)
and prefill chunks (on par with oneDNN). A row's result does not depend on the other rows of
its step, so a request computes the same bits in any batch.

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
