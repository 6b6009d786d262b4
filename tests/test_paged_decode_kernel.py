"""The fused paged decode-attention CPU kernel (engine/kernels) against plain references.

The reference gathers each request's context through its block table and applies softmax in
float64. Shapes cover GQA groups 1/3/4, head_dim 64/128 (compile-time paths) and 80 (the
generic path), block sizes 8/16, contexts around block boundaries and long ones; block tables
repeat and share blocks; everything a request must not read (padding entries of its block
table, the unused tail of its last block) is NaN/inf garbage; 1 and 2 threads.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.attention import AttentionMetadata, paged_attention
from engine.kernels import cpu_ops

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("kernel")  # conftest: built once, else skipped


def make_case(contexts, kv_heads, group, head_dim, block_size, dtype=torch.float32, seed=0,
              index_dtype=torch.long):
    """Returns q, kv_layer, block_tables, context_lens. Full blocks are drawn with replacement
    from a shared pool (repeated within and across requests); each request's last, partial
    block is its own, with NaN/inf past the context; padding entries point at a garbage block."""
    gen = torch.Generator().manual_seed(seed)
    n = len(contexts)
    max_blocks = max(-(-c // block_size) for c in contexts) + 2  # always some padding
    shared = 6
    num_blocks = shared + n + 1
    garbage = num_blocks - 1
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    kv[:, garbage] = float("nan")
    kv[0, garbage, ::2] = float("inf")
    kv[1, garbage, 1::2] = -float("inf")
    tables = torch.full((n, max_blocks), garbage, dtype=torch.long)
    for i, c in enumerate(contexts):
        full, tail = divmod(c, block_size)
        tables[i, :full] = torch.randint(0, shared, (full,), generator=gen)
        if tail:
            own = shared + i
            tables[i, full] = own
            kv[:, own, tail:] = float("nan")
    q = torch.randn(n, kv_heads * group, head_dim, generator=gen)
    return (q.to(dtype), kv.to(dtype), tables.to(index_dtype),
            torch.tensor(contexts, dtype=index_dtype))


def reference(q, kv, tables, contexts, scale):
    """float64 gather + softmax, one request at a time."""
    n, heads, head_dim = q.shape
    block_size, kv_heads = kv.shape[2], kv.shape[3]
    group = heads // kv_heads
    out = torch.empty(n, heads, head_dim, dtype=torch.float64)
    for i in range(n):
        c = int(contexts[i])
        blocks = tables[i, :-(-c // block_size)].long()
        keys = kv[0][blocks].flatten(0, 1)[:c].double()  # [c, KV, D]
        values = kv[1][blocks].flatten(0, 1)[:c].double()
        for h in range(heads):
            p = torch.softmax(keys[:, h // group] @ q[i, h].double() * scale, dim=0)
            out[i, h] = p @ values[:, h // group]
    return out


def assert_close(got, want, rtol):
    assert torch.isfinite(got).all(), "the kernel read garbage (NaN/inf) it should have skipped"
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("block_size", [8, 16])
def test_matches_reference_fp32(threads, group, head_dim, block_size):
    contexts = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 1000]
    q, kv, tables, ctx = make_case(contexts, 2, group, head_dim, block_size,
                                   seed=group * 1000 + head_dim + block_size)
    scale = head_dim ** -0.5
    got = cpu_ops.paged_decode_attention(q, kv, tables, ctx, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert_close(got, reference(q, kv, tables, ctx, scale), rtol=1e-5)


def test_model_shapes_many_requests(threads):
    """The default model's heads (9 q / 3 kv, head_dim 64), a batch of 64 mixed contexts."""
    gen = torch.Generator().manual_seed(7)
    contexts = torch.randint(1, 300, (64,), generator=gen).tolist()
    q, kv, tables, ctx = make_case(contexts, 3, 3, 64, 16, seed=7)
    got = cpu_ops.paged_decode_attention(q, kv, tables, ctx, 0.125)
    assert_close(got, reference(q, kv, tables, ctx, 0.125), rtol=1e-5)


def test_int32_tables_and_out_argument():
    q, kv, tables, ctx = make_case([5, 17, 40], 3, 3, 64, 16, index_dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    got = cpu_ops.paged_decode_attention(q, kv, tables, ctx, 0.125, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(out, reference(q, kv, tables, ctx, 0.125), rtol=1e-5)


def test_queries_read_in_place_from_a_wider_row():
    """q as the engine passes it, a view into the fused QKV rows (rows strided, heads
    contiguous), and a q whose heads are strided too: the same bits as a contiguous copy."""
    q, kv, tables, ctx = make_case([5, 17, 40, 3], 3, 3, 64, 16, seed=4)
    want = cpu_ops.paged_decode_attention(q, kv, tables, ctx, 0.125)
    qkv = torch.full((4, (9 + 6) * 64), float("nan"))  # K and V columns after the queries
    qkv[:, :9 * 64] = q.flatten(1)
    view = qkv[:, :9 * 64].view(4, 9, 64)
    assert not view.is_contiguous()
    assert torch.equal(cpu_ops.paged_decode_attention(view, kv, tables, ctx, 0.125), want)
    heads_strided = torch.cat([q, q], dim=2)[:, :, :64]
    assert heads_strided.stride(1) != 64
    assert torch.equal(cpu_ops.paged_decode_attention(heads_strided, kv, tables, ctx, 0.125), want)


def test_same_bits_whatever_the_batch_and_threads():
    """A request's output does not depend on the thread count or on its batch neighbours."""
    q, kv, tables, ctx = make_case([1, 33, 100, 517, 64, 2], 3, 3, 64, 16, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.paged_decode_attention(q, kv, tables, ctx, 0.125)
        alone = [cpu_ops.paged_decode_attention(q[i:i + 1], kv, tables[i:i + 1],
                                                     ctx[i:i + 1], 0.125)[0]
                 for i in range(len(q))]
        torch.set_num_threads(2)
        two = cpu_ops.paged_decode_attention(q, kv, tables, ctx, 0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert torch.equal(one, torch.stack(alone))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(dtype):
    q, kv, tables, ctx = make_case([1, 15, 16, 17, 300], 2, 3, 64, 16, dtype=dtype, seed=5)
    got = cpu_ops.paged_decode_attention(q, kv, tables, ctx, 0.125)
    assert got.dtype == dtype
    # inputs are exactly representable; the error is the fp32-accumulated result's rounding
    assert_close(got, reference(q, kv, tables, ctx, 0.125), rtol=1e-2)


def test_same_as_sdpa_path_in_paged_attention():
    """paged_attention's decode part: the kernel path equals the gather + masked SDPA path."""
    contexts = [3, 16, 31, 200]
    q, kv, tables, ctx = make_case(contexts, 3, 3, 64, 16, seed=11)
    tables[tables == kv.shape[1] - 1] = 0  # the runner pads with block 0: the mask must hide it
    kv = torch.nan_to_num(kv)  # SDPA reads the padding, masked: keep it finite
    nd, bs = len(contexts), 16
    # one new token per request, written at its last position (the kernel must see it)
    k_new = torch.randn(nd, 3, 64)
    v_new = torch.randn(nd, 3, 64)
    pos = ctx - 1
    slots = tables[torch.arange(nd), pos // bs] * bs + pos % bs
    key_pos = torch.arange(tables.shape[1] * bs)
    mask = (key_pos[None, :] < ctx[:, None]).view(nd, 1, 1, -1)
    sdpa_meta = AttentionMetadata(slots, nd, tables, mask, [], decode_context_lens=ctx)
    kernel_meta = AttentionMetadata(slots, nd, tables, None, [], decode_context_lens=ctx,
                                    decode_kernel=True)
    # distinct blocks per written slot so both paths see the same cache
    assert len(set(slots.tolist())) == nd
    want = paged_attention(q, k_new, v_new, kv.clone(), sdpa_meta, 0.125)
    got = paged_attention(q, k_new, v_new, kv.clone(), kernel_meta, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_tables_raise():
    q, kv, tables, ctx = make_case([5, 20], 1, 2, 64, 16)
    bad = tables.clone()
    bad[1, 0] = kv.shape[1]  # one past the last block
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.paged_decode_attention(q, kv, bad, ctx, 0.125)
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_ops.paged_decode_attention(q, kv, tables, torch.tensor([5, 10_000]), 0.125)
    # entries past the context are never looked at, even when out of range
    ok = tables.clone()
    ok[0, 1:] = 10**9
    got = cpu_ops.paged_decode_attention(q, kv, ok, ctx, 0.125)
    assert_close(got, reference(q, kv, tables, ctx, 0.125), rtol=1e-5)


def test_forced_off_by_env(monkeypatch):
    monkeypatch.setenv("PDSERVE_ATTENTION", "sdpa")
    assert not cpu_ops.available()
    from engine.attention import decode_kernel_enabled
    assert not decode_kernel_enabled(torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_concurrent_first_builds(tmp_path):
    """Two processes building into an empty extensions dir at once (Ray workers starting
    together) both get the kernel, also over a lock file left by a builder that was killed."""
    ext_dir = tmp_path / "ext"
    script = textwrap.dedent("""
        import sys
        from engine.kernels import cpu_ops
        ok = cpu_ops.available()
        print("OK" if ok else "FAIL " + str(cpu_ops._state["error"]))
        sys.exit(0 if ok else 1)
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir), PYTHONPATH=str(REPO))
    env.pop("PDSERVE_ATTENTION", None)
    # a dead builder's torch lock file in the build directory
    probe = subprocess.run(
        [sys.executable, "-c", "from torch.utils import cpp_extension as c; "
         "from engine.kernels import cpu_ops as p; "
         "print(c._get_build_directory(p._extension_name(), False))"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True)
    build_dir = Path(probe.stdout.strip().splitlines()[-1])
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lock").touch()
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert not (build_dir / "lock").exists()

