"""Smoke test of `pdserve bench engine --quick --json` (no peers): the JSON line has every
figure, each one sane, and the derived ratios agree with the figures they come from."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(model_dir):  # model_dir: converted once per session by conftest
    pytest.importorskip("transformers")
    env = dict(os.environ, PDSERVE_BENCH_PEERS="0", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "engine", "--quick", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(420)
def test_bench_json_has_sane_figures(bench):
    r, stdout = bench
    for key in ("offline_tokens_per_s", "hf_offline_tokens_per_s", "throughput_ratio_vs_hf",
                "single_stream_tokens_per_s", "hf_single_stream_tokens_per_s", "cpu_time_ratio_vs_hf",
                "mem_bandwidth_gbps", "mem_copy_gbps", "mem_read_gbps", "weight_bytes",
                "roofline_tokens_per_s_batch1", "roofline_fraction_batch1"):
        assert positive(r.get(key)), (key, r.get(key))
    assert r["quick"] is True and r["threads"] >= 1
    assert r["prefill_tokens_per_s"] and all(positive(v) for v in r["prefill_tokens_per_s"].values())
    assert set(r["prefill_tokens_per_s"]) == {str(n) for n in r["sizes"]["prefill_lens"]}
    # peers were switched off: present as empty, the vLLM ratio as null
    assert r["peers"] == {} and "throughput_ratio_vs_vllm_cpu" in r
    assert r["throughput_ratio_vs_vllm_cpu"] is None
    # fp32 weights of a ~135M-parameter model, read once per step
    assert 4e8 < r["weight_bytes"] < 7e8
    assert 0.5 < r["mem_bandwidth_gbps"] < 5000
    assert r["mem_bandwidth_gbps"] == max(r["mem_copy_gbps"], r["mem_read_gbps"])
    assert "throughput_ratio_vs_hf" in stdout and "roofline_fraction_batch1" in stdout


@pytest.mark.timeout(420)
def test_bench_ratios_follow_from_figures(bench):
    r, _ = bench
    ratio = r["offline_tokens_per_s"] / r["hf_offline_tokens_per_s"]
    assert r["throughput_ratio_vs_hf"] == pytest.approx(ratio, rel=2e-3)
    cpu_ratio = r["hf"]["offline"]["cpu_s"] / r["pdserve"]["offline"]["cpu_s"]
    assert r["cpu_time_ratio_vs_hf"] == pytest.approx(cpu_ratio, rel=2e-3)
    roofline = r["mem_bandwidth_gbps"] * 1e9 / r["weight_bytes"]
    assert r["roofline_tokens_per_s_batch1"] == pytest.approx(roofline, rel=2e-3)
    assert r["roofline_fraction_batch1"] == pytest.approx(
        r["single_stream_tokens_per_s"] / roofline, rel=2e-3, abs=1e-4)


@pytest.mark.timeout(420)
def test_bench_ran_the_sizes_it_reports(bench):
    r, _ = bench
    s = r["sizes"]
    ours, hf = r["pdserve"], r["hf"]
    assert ours["offline"]["output_tokens"] == s["num_prompts"] * s["max_tokens"]
    assert hf["offline"]["output_tokens"] == s["num_prompts"] * s["max_tokens"]
    assert ours["offline"]["preemptions"] == 0
    assert ours["single"]["output_tokens"] == hf["single"]["output_tokens"] == s["single_tokens"]
    assert ours["offline"]["tokens_per_s"] == pytest.approx(r["offline_tokens_per_s"], rel=1e-3)
    # Both engines run the same greedy model on the same prompts: their first tokens agree.
    assert r["hf_agreement_first8"] >= 0.75


@pytest.mark.timeout(420)
def test_bench_reports_its_float32_matmul(bench):
    """Where the engine ran the AMX maths, the FMA kernel's offline figure sits beside it."""
    r, stdout = bench
    assert r["fp32_matmul"] in ("ieee", "bf16x3", "bf16x6")
    assert f"float32 matmul                {r['fp32_matmul']}" in stdout
    if r["fp32_matmul"] == "ieee":
        assert r["offline_tokens_per_s_ieee"] is None and r["throughput_ratio_vs_hf_ieee"] is None
        assert "offline_ieee" not in r["pdserve"]
        return
    s = r["sizes"]
    assert positive(r["offline_tokens_per_s_ieee"])
    assert r["pdserve"]["offline_ieee"]["output_tokens"] == s["num_prompts"] * s["max_tokens"]
    assert r["throughput_ratio_vs_hf_ieee"] == pytest.approx(
        r["offline_tokens_per_s_ieee"] / r["hf_offline_tokens_per_s"], rel=2e-3)
    assert r["ieee_agreement_first8"] >= 0.75
    assert "offline with ieee (FMA)" in stdout
