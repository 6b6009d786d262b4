"""The engine's C++ CPU kernels: one torch extension, compiled on first use, and its Python
entry points.

Fused paged decode attention (paged_decode.cpp): `paged_decode_attention(q, kv_layer,
block_tables, context_lens, scale)` attends one query token per request to the first
`context_lens[n]` positions of its paged context, reading K/V in place from the cache layer
through the block table (no gathered copy, no mask) with an online softmax, each kv head with
its GQA group of query heads. float32, bfloat16 and float16
(accumulated in fp32); CPU only. It follows torch's intra-op thread count.

The same extension carries the float32 linear layer of packed_linear.cpp (`pack_linear_weight`,
`packed_linear`: a weight packed once into column panels, for every row count from batch-1
decode to a prefill chunk; `pack_gated_weight`, `gated_linear`: a gated MLP's gate_up
projection with silu(gate) * up in its epilogue), its AMX form of amx_linear.cpp (float32 as sums
of bfloat16 parts on the tile unit: `amx_available`, `pack_amx_weight`, `amx_linear`,
`pack_amx_gated_weight`, `amx_gated_linear`) and the fused float32 residual-add + RMSNorm, in-place RoPE,
silu(gate) * up, the K/V write into cache slots and a greedy argmax over rows of fused_ops.cpp
(`add_rms_norm`, `rope_`, `silu_mul`, `store_kv`, `argmax_rows`).

`available()` builds the extension once per process (torch.utils.cpp_extension with ninja and
the C++ compiler, -O3 -march=native -fopenmp, about 15 s; then cached on disk in torch's
extensions directory, ~/.cache/torch_extensions/, or TORCH_EXTENSIONS_DIR) and caches the answer;
any failure (no compiler, no ninja, a compile error) logs one warning and returns False so that
callers keep the SDPA path (and F.linear). PDSERVE_ATTENTION=sdpa makes it return False without
building: the engine then uses torch's own ops only.
PDSERVE_KERNEL_CFLAGS adds compiler flags (e.g. -march=x86-64-v3 for a binary that other
machines sharing the cache can run).

The build directory is named after this CPU's feature flags, the flags and the torch version,
so a cache shared by different machines never loads code built for another instruction set.
Concurrent first builds (Ray workers starting together) are serialised by an flock on a file
beside the build directory, which the kernel releases if its holder dies; torch's own lock
file, which a killed builder leaves behind and on which later builders would wait forever, is
removed under it.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.cpp")
SOURCES = [SOURCE] + [Path(__file__).with_name(f)  # one extension
                      for f in ("packed_linear.cpp", "amx_linear.cpp", "fused_ops.cpp")]
HEADERS = [Path(__file__).with_name("vec16.h")]
CFLAGS = ["-O3", "-march=native", "-fopenmp"] + os.environ.get("PDSERVE_KERNEL_CFLAGS", "").split()
LDFLAGS = ["-fopenmp"]
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BUILD_LOCK_TIMEOUT_S = 900.0

_state: dict = {"ok": None, "error": None, "build_s": None}
_lock = threading.Lock()


def _cpu_tag() -> str:
    """Short hash of what the binary depends on: ISA flags, compiler flags, torch version, and
    the headers (torch rebuilds when a listed source changes, but not when only a header does)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        flags = platform.processor()
    headers = hashlib.sha1(b"".join(p.read_bytes() for p in HEADERS)).hexdigest()
    key = "|".join([platform.machine(), flags, " ".join(CFLAGS), torch.__version__, headers])
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _extension_name() -> str:
    return f"pdserve_cpu_ops_{_cpu_tag()}"


def _ensure_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv's pip-installed ninja is not on it unless activated."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]
        candidates.append(Path(ninja.BIN_DIR))
    except Exception:  # noqa: BLE001 - the package is optional
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{d}"
            return


def _build() -> None:
    from torch.utils import cpp_extension

    _ensure_ninja_on_path()
    name = _extension_name()
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    lock_path = build_dir.with_name(build_dir.name + ".flock")
    with open(lock_path, "a") as lock:
        deadline = time.monotonic() + BUILD_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process holds {lock_path}") from None
                time.sleep(0.1)
        try:
            # Only flock holders build here, so a torch lock file now is a dead builder's.
            stale = build_dir / "lock"
            if stale.exists():
                stale.unlink()
            cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS,
                               extra_ldflags=LDFLAGS, build_directory=str(build_dir),
                               is_python_module=False, verbose=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    op = torch.ops.pdserve.paged_decode_attention
    # Smoke test: one request, one block, against the plain formula (own generator: the
    # global RNG's state is the caller's).
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, generator=gen)
    kv = torch.randn(2, 2, 4, 1, 8, generator=gen)
    out = torch.empty_like(q)
    op(out, q, kv, torch.tensor([[1]], dtype=torch.int32), torch.tensor([3]), 0.5)
    keys, values = kv[0, 1, :3, 0], kv[1, 1, :3, 0]
    want = torch.softmax(q[0] @ keys.T * 0.5, dim=-1) @ values
    if not torch.allclose(out[0], want, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the compiled attention kernel fails its smoke test")
    w, x, b = (torch.randn(shape, generator=gen) for shape in ((5, 3), (2, 3), (5,)))
    y = torch.ops.pdserve.packed_linear(x, torch.ops.pdserve.pack_linear_weight(w), b, 5)
    if not torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-5):
        raise RuntimeError("the compiled linear kernel fails its smoke test")
    gate, up = F.linear(x, w[:4]).chunk(2, dim=-1)
    y = torch.ops.pdserve.gated_linear(x, torch.ops.pdserve.pack_gated_weight(w[:4]), 2)
    if not torch.allclose(y, F.silu(gate) * up, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the compiled gated linear kernel fails its smoke test")


def forced_off() -> bool:
    return os.environ.get("PDSERVE_ATTENTION", "").strip().lower() == "sdpa"


def available() -> bool:
    """Builds and loads the kernel once per process; False (with one warning) if it cannot."""
    if forced_off():
        return False
    if _state["ok"] is not None:
        return _state["ok"]
    with _lock:
        if _state["ok"] is not None:
            return _state["ok"]
        t = time.perf_counter()
        try:
            _build()
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
            _state["ok"] = False
            _state["error"] = f"{type(e).__name__}: {e}"
            log.warning("paged decode attention kernel unavailable, using SDPA (%s)",
                        _state["error"].splitlines()[0][:500])
            log.debug("paged decode kernel build failure", exc_info=True)
        _state["build_s"] = time.perf_counter() - t
    return _state["ok"]


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q [N, H, D], kv_layer [2, num_blocks, block_size, KV, D], block_tables [N, max_blocks]
    int32/int64, context_lens [N] int32/int64 -> [N, H, D] (written into `out` if given, which
    must be contiguous). Block table entries past a request's context are never read."""
    if not _state["ok"] and not available():
        raise RuntimeError(f"paged decode kernel unavailable: {_state['error'] or 'PDSERVE_ATTENTION=sdpa'}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.pdserve.paged_decode_attention(out, q, kv_layer, block_tables, context_lens, scale)
    return out


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] float32 -> the panel layout `packed_linear` reads, [ceil(out / NR), in,
    NR] (NR = 48 output columns with AVX-512, 24 otherwise; the last panel zero-padded)."""
    return torch.ops.pdserve.pack_linear_weight(weight)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    """x [rows, in] float32 (rows may be strided) -> x W^T + bias [rows, out_features], W as
    packed by `pack_linear_weight`. A row's result has the same bits whatever the other rows."""
    return torch.ops.pdserve.packed_linear(x, packed, bias, out_features)


def pack_gated_weight(weight: torch.Tensor) -> torch.Tensor:
    """A gated MLP's gate_up weight [2I, in] float32 (gate rows, then up rows) -> the panel pairs
    `gated_linear` reads, [2 * ceil(I / NR), in, NR]: gate panel j, then the up panel of the
    same output columns."""
    return torch.ops.pdserve.pack_gated_weight(weight)


def gated_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [rows, in] float32 -> silu(x Wg^T) * (x Wu^T) [rows, out_features], one pass over a
    weight packed by `pack_gated_weight`: the same bits as `packed_linear` then `silu_mul`."""
    return torch.ops.pdserve.gated_linear(x, packed, out_features)


def amx_available() -> bool:
    """Whether the AMX linear kernel runs here: built for a CPU with AMX-BF16, granted the tile
    state by the OS, and through its smoke test (once per process; a failure logs one warning
    and leaves the other kernels on). False where the kernels are unavailable."""
    if not available():
        return False
    if _state.get("amx") is None:
        with _lock:
            if _state.get("amx") is None:
                _state["amx"] = _amx_smoke_test()
    return _state["amx"]


def _amx_smoke_test() -> bool:
    ops = torch.ops.pdserve
    try:
        if not ops.amx_linear_available():
            return False
        # 40 rows, 37 outputs, 70 inputs: tails in every dimension; gate_up of 2 x 20 outputs
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=gen) for shape in ((40, 70), (40, 70), (40,)))
        for parts in (2, 3):
            y = ops.amx_linear(x, ops.pack_amx_weight(w[:37], parts), b[:37], 70, 37)
            if not torch.allclose(y, F.linear(x, w[:37], b[:37]), rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"the AMX linear kernel ({parts} parts) fails its smoke test")
            gate, up = F.linear(x, w).chunk(2, dim=-1)
            y = ops.amx_gated_linear(x, ops.pack_amx_gated_weight(w, parts), 70, 20)
            if not torch.allclose(y, F.silu(gate) * up, rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"the AMX gated linear kernel ({parts} parts) fails its smoke test")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: the FMA kernel instead
        log.warning("AMX linear kernel unavailable, using the float32 FMA kernel (%s)", str(e)[:500])
        return False


def pack_amx_weight(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """weight [out, in] float32 -> the AMX layout `amx_linear` reads, [P, ceil(in / 32), parts,
    16, 32] bfloat16 (P: 16-column panels, an even number): `parts` = 2 (bf16x3) or 3 (bf16x6)
    bf16 parts of each weight, in the tiles' pair-interleaved order; zero-padded."""
    return torch.ops.pdserve.pack_amx_weight(weight, parts)


def amx_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, in_features: int,
               out_features: int) -> torch.Tensor:
    """x [rows, in] float32 -> x W^T + bias [rows, out_features] on the AMX tiles, W as packed by
    `pack_amx_weight` (x split into the same number of parts; in_features: W's, checked against
    x). A row's result has the same bits whatever the other rows. An inf or NaN in x or W gives
    NaN where it meets (float32 products could give +-inf)."""
    return torch.ops.pdserve.amx_linear(x, packed, bias, in_features, out_features)


def pack_amx_gated_weight(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """A gated MLP's gate_up weight [2I, in] float32 -> AMX panel pairs (gate panel j at 2j, the
    up panel of the same 16 columns at 2j + 1) for `amx_gated_linear`."""
    return torch.ops.pdserve.pack_amx_gated_weight(weight, parts)


def amx_gated_linear(x: torch.Tensor, packed: torch.Tensor, in_features: int,
                     out_features: int) -> torch.Tensor:
    """x [rows, in] float32 -> silu(x Wg^T) * (x Wu^T) [rows, out_features] on the AMX tiles."""
    return torch.ops.pdserve.amx_gated_linear(x, packed, in_features, out_features)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """residual [T, H] += delta (in place, if given); returns RMSNorm(residual) * weight [T, H].
    float32, contiguous; callers check `available()` once."""
    out = torch.empty_like(residual)
    torch.ops.pdserve.add_rms_norm(out, residual, delta, weight, eps)
    return out


def rope_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          num_heads: int, head_dim: int) -> None:
    """Rotates, in place, the first `num_heads` heads of each row of qkv [T, >= num_heads *
    head_dim] (the Q then K heads of a fused QKV output) by cos/sin [max_pos, head_dim / 2]
    at `positions` [T] int64; the HF rotate-half layout. float32."""
    torch.ops.pdserve.rope_(qkv, positions, cos, sin, num_heads, head_dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate then up) -> silu(gate) * up [T, I], float32, one pass."""
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    torch.ops.pdserve.silu_mul(out, gate_up)
    return out


def store_kv(kv_layer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes k/v [T, KV, D] (each token's KV * D values contiguous) into kv_layer [2,
    num_blocks, block_size, KV, D] at the flat slots [T] int64; any dtype, CPU."""
    torch.ops.pdserve.store_kv(kv_layer, slots, k, v)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, n] float32 (each row contiguous) -> int64 [rows]: torch.argmax(x, dim=-1)'s
    answer (first index of the maximum, a NaN counts as the maximum), rows split over threads."""
    out = torch.empty(x.shape[0], dtype=torch.long)
    torch.ops.pdserve.argmax_rows(out, x)
    return out


def build_seconds() -> float | None:
    """Wall seconds the first available() took in this process (build or cache load)."""
    return _state["build_s"]
