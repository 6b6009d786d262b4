"""Smoke test of benchmarks/linear_bench.py at toy sizes: every available math is timed, the
speed-ups follow from the times, and the accuracy column tells the maths apart."""
from __future__ import annotations

import pytest

from benchmarks import linear_bench
from engine.kernels import cpu_ops


def test_linear_bench_figures(kernel, capsys):
    result = linear_bench.main(["--layers", "1", "--rows", "1", "17", "--repeats", "1", "--json"])
    maths = result["maths"]
    want = {"torch", "ieee"} | ({"bf16x3", "bf16x6"} if cpu_ops.amx_available() else set())
    assert set(maths) == want
    for math, entry in maths.items():
        assert set(entry["rows"]) == {"1", "17"}
        for rows, r in entry["rows"].items():
            assert r["ms"] > 0 and r["gflops"] > 0
            assert r["speedup_vs_torch"] == pytest.approx(maths["torch"]["rows"][rows]["ms"] / r["ms"])
            assert r["speedup_vs_ieee"] == pytest.approx(maths["ieee"]["rows"][rows]["ms"] / r["ms"])
    # float32's rounding for the exact maths and three parts; ~2^-16 a product for two parts
    for math in ("torch", "ieee", "bf16x6"):
        if math in maths:
            assert maths[math]["max_rel_error"] < 1e-5, math
    if "bf16x3" in maths:
        assert 1e-6 < maths["bf16x3"]["max_rel_error"] < 1e-3
    out = capsys.readouterr().out
    assert "ms per pass" in out and out.strip().splitlines()[-1].startswith('{"bench": "linear"')
