"""`pdserve bench serve`: the figures on synthetic timings (exact), the seeded workloads,
and one quick end-to-end run that deploys a small colocated service on the test's Ray."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from benchmarks import serve_bench, serve_engine
from benchmarks.serve_metrics import (RequestRecord, aggregate, cost_per_mtok, distribution,
                                      goodput, interference, ratio, summarize)
from benchmarks.serve_report import (compare, cost_table, goals, goals_table, interference_table,
                                     ratio_table, run_table)
from benchmarks.serve_workload import (INTERFERENCE, INTERFERENCE_QUICK, PRESETS, LengthDist,
                                       arrival_offsets, count_for_duration,
                                       make_interference_requests, make_requests)


def rec(i, ttft=0.5, e2e=2.5, out=5, prompt=10, times=None, error=None):
    return RequestRecord(i, 0.0, prompt, out, ttft, e2e, times or [], error)


# -- metrics ----------------------------------------------------------------------------

def test_distribution_interpolates_linearly():
    d = distribution([4.0, 1.0, 3.0, 2.0])
    assert d == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97})
    d = distribution(float(x) for x in range(1, 101))
    assert d == pytest.approx({"mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert distribution([None, 7.0])["p99"] == 7.0


def test_per_request_tpot_and_itl():
    r = rec(0, ttft=0.5, e2e=2.5, out=5, times=[0.5, 0.75, 1.25, 2.0, 2.5])
    assert r.tpot_s == pytest.approx(0.5)  # (2.5 - 0.5) / 4
    assert r.itls_s == pytest.approx([0.25, 0.5, 0.75, 0.5])
    assert rec(1, out=1).tpot_s is None  # one token: no gap
    assert rec(2, error="UNAVAILABLE: x").tpot_s is None


def test_goodput_counts_requests_meeting_both_slos():
    records = [
        rec(0, ttft=0.5, e2e=0.5 + 0.1 * 9, out=10),  # tpot 0.1: good
        rec(1, ttft=2.0, e2e=3.0, out=10),  # TTFT over 1.0
        rec(2, ttft=0.5, e2e=0.5 + 0.3 * 9, out=10),  # TPOT 0.3 over 0.2
        rec(3, error="DEADLINE_EXCEEDED: late"),  # failed: never good
        rec(4, ttft=0.4, e2e=0.4, out=1),  # one token: only TTFT applies
        rec(5, ttft=1.0, e2e=1.0 + 0.2 * 4, out=5),  # exactly at both SLOs: good
    ]
    assert [r.meets(1.0, 0.2) for r in records] == [True, False, False, False, True, True]
    assert goodput(records, 2.0, 1.0, 0.2) == 1.5
    assert goodput(records, 0.0, 1.0, 0.2) == 0.0
    s = summarize(records, 2.0, ttft_slo_s=1.0, tpot_slo_s=0.2, cost_per_hour=0.09,
                  tpot_slo_grid=(0.2, 0.5))
    assert (s["requests"], s["completed"], s["failed"], s["good_requests"]) == (6, 5, 1, 3)
    assert s["errors"] == {"DEADLINE_EXCEEDED": 1}
    assert s["slo_attainment"] == 0.5 and s["goodput"] == 1.5
    assert s["goodput_by_tpot_slo"] == {"0.2": 1.5, "0.5": 2.0}
    assert s["output_tokens"] == 36 and s["prompt_tokens"] == 50
    assert s["request_throughput"] == 2.5 and s["output_throughput"] == 18.0
    assert s["total_token_throughput"] == 43.0
    assert s["good_output_throughput"] == 8.0  # 10 + 1 + 5 tokens over 2 s
    assert s["ttft_s"]["p50"] == 0.5 and s["ttft_s"]["mean"] == pytest.approx(0.88)


def test_cost_per_million_output_tokens():
    # 2 replicas x $0.045/h = $0.09/h; 25 tok/s = 90 000 tok/h -> $1 per million
    assert cost_per_mtok(0.09, 25.0) == pytest.approx(1.0)
    assert cost_per_mtok(0.09, 0.0) is None
    # 200 tokens in 8 s = 25 tok/s; half of them from requests over the TTFT SLO
    records = [rec(i, ttft=0.5 if i % 2 else 3.0, e2e=5.0, out=50) for i in range(4)]
    s = summarize(records, 8.0, ttft_slo_s=1.0, tpot_slo_s=0.2, cost_per_hour=0.09)
    assert s["cost_per_mtok"] == pytest.approx(1.0)
    assert s["cost_per_mtok_at_slo"] == pytest.approx(2.0)
    total = aggregate([s, s], 0.09)  # two runs: the same rates over twice the time
    assert total["duration_s"] == 16.0 and total["output_tokens"] == 400
    assert total["goodput"] == 0.25 and total["output_throughput"] == 25.0
    assert total["cost_per_mtok"] == pytest.approx(1.0)
    assert total["cost_per_mtok_at_slo"] == pytest.approx(2.0)
    none = summarize([rec(0, error="UNAVAILABLE: down")], 1.0, ttft_slo_s=1.0, tpot_slo_s=0.2,
                     cost_per_hour=0.09)
    assert none["cost_per_mtok"] is None and none["goodput"] == 0.0


def _layout(goodputs: dict, cost=0.09) -> dict:
    runs = []
    for (workload, rate), (good, tpot99) in goodputs.items():
        records = [rec(i, ttft=0.5, e2e=0.5 + tpot99 * 9, out=10) for i in range(good)]
        s = summarize(records, 10.0, ttft_slo_s=1.0, tpot_slo_s=0.2, cost_per_hour=cost,
                      tpot_slo_grid=(0.1, 0.15, 0.5))
        runs.append(dict(workload=workload, rate=rate, **s))
    return {"runs": runs, "total": aggregate(runs, cost)}


def test_compare_disaggregated_with_colocated():
    disagg = _layout({("prefill-heavy", 0.5): (6, 0.1), ("decode-heavy", 1.0): (3, 0.1)})
    coloc = _layout({("prefill-heavy", 0.5): (4, 0.2), ("decode-heavy", 1.0): (6, 0.1)})
    c = compare({"disaggregated": disagg, "colocated": coloc})
    assert c["by_run"]["prefill-heavy"]["0.5"]["goodput"] == pytest.approx(1.5)
    assert c["by_run"]["prefill-heavy"]["0.5"]["tpot_p99"] == pytest.approx(0.5)
    assert c["by_run"]["decode-heavy"]["1"]["output_throughput"] == pytest.approx(0.5)
    assert c["by_run"]["decode-heavy"]["1"]["cost_per_mtok"] == pytest.approx(2.0)
    assert c["goodput_ratio_by_workload"] == pytest.approx({"prefill-heavy": 1.5,
                                                            "decode-heavy": 0.5})
    assert c["goodput_ratio_disagg_vs_colocated"] == pytest.approx(0.9)  # (0.6+0.3)/(0.4+0.6)
    # the same price, 90 vs 100 output tokens in 20 s: disaggregated costs 10/9 as much
    assert c["cost_per_mtok_ratio_disagg_vs_colocated"] == pytest.approx(100 / 90)
    assert c["cost_per_mtok_at_slo_ratio_disagg_vs_colocated"] == pytest.approx(
        disagg["total"]["cost_per_mtok_at_slo"] / coloc["total"]["cost_per_mtok_at_slo"])
    assert "$/Mtok ratio, all runs: 1.11" in ratio_table(c)
    assert "disaggregated" in cost_table({"disaggregated": disagg, "colocated": coloc})
    # colocated's prefill-heavy requests (TPOT 0.2 s) meet only the 0.5 s SLO of the grid;
    # a ratio over a zero goodput is None
    assert c["goodput_ratio_by_tpot_slo"]["prefill-heavy"] == pytest.approx(
        {"0.1": None, "0.15": None, "0.5": 1.5})
    assert "prefill-heavy" in ratio_table(c) and "colocated" in run_table({"colocated": coloc})
    alone = compare({"colocated": coloc})
    assert alone["goodput_ratio_disagg_vs_colocated"] is None and "one layout" in ratio_table(alone)
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None and ratio(3.0, 2.0) == 1.5


def test_decode_interference_counts_the_stream_only():
    alone = [rec(i, ttft=0.5, e2e=0.5 + 0.1 * 9, out=10, times=[0.5 + 0.1 * k for k in range(10)])
             for i in range(4)]
    # with long prompts: one request stalls 1 s once, so its TPOT is (0.9 + 1) / 9
    hit = rec(0, ttft=0.5, e2e=0.5 + 0.9 + 1.0, out=10,
              times=[0.5 + 0.1 * k + (1.0 if k >= 5 else 0.0) for k in range(10)])
    with_long = [hit] + alone[1:] + [rec(9, error="UNAVAILABLE: x")]
    f = interference(alone, with_long)
    assert f["tpot_p99_alone"] == pytest.approx(0.1)
    tpots = [1.9 / 9, 0.1, 0.1, 0.1]
    assert f["tpot_p99_with_long_prompts"] == pytest.approx(float(np.percentile(tpots, 99)))
    assert f["tpot_p99_interference"] == pytest.approx(f["tpot_p99_with_long_prompts"] / 0.1)
    assert f["tpot_p50_interference"] == pytest.approx(1.0)
    assert f["itl_p99_alone"] == pytest.approx(0.1)
    assert f["itl_p99_with_long_prompts"] > 0.5  # the 1.1 s gap
    assert f["stream_failed"] == {"alone": 0, "with_long_prompts": 1}
    none = interference([], [])
    assert none["tpot_p99_alone"] is None and none["tpot_p99_interference"] is None
    entry = dict(f, stream={"num_requests": 4}, long_prompts={"num_requests": 2},
                 with_long_prompts={"long_prompts": {"ttft_s": {"p50": 3.0}}})
    table = interference_table({"disaggregated": entry})
    assert "disaggregated" in table and f"{f['tpot_p99_interference']:.2f}" in table


def test_goals_of_a_run():
    result = {"goodput_ratio_disagg_vs_colocated": 1.6,
              "goodput_ratio_by_workload": {"prefill-heavy": 2.0, "decode-heavy": 1.3},
              "cost_per_mtok_at_slo_ratio_disagg_vs_colocated": 0.8,
              "interference": {"disaggregated": {"tpot_p99_interference": 1.05},
                               "colocated": {"tpot_p99_interference": 3.0}},
              "engine_comparison": {"throughput_ratio_vs_hf": 1.5,
                                    "roofline_fraction_batch1": 0.7}}
    g = goals(result)
    assert {k: v["met"] for k, v in g.items()} == {
        "goodput_ratio_disagg_vs_colocated": True,
        "goodput_ratio_prefill-heavy": True, "goodput_ratio_decode-heavy": False,
        "cost_per_mtok_at_slo_ratio_disagg_vs_colocated": True,
        "tpot_p99_interference_disaggregated": True,
        "throughput_ratio_vs_hf": False, "roofline_fraction_batch1": True}
    assert g["tpot_p99_interference_disaggregated"]["value"] == 1.05
    unmeasured = goals({"goodput_ratio_disagg_vs_colocated": None})
    assert unmeasured["goodput_ratio_disagg_vs_colocated"]["met"] is None
    assert "throughput_ratio_vs_hf" not in unmeasured
    assert "roofline_fraction_batch1" in goals_table(g)


# -- engine comparison --------------------------------------------------------------------

ENGINE_RESULT = {
    "bench": "engine", "sizes_name": "medium", "sizes": {"num_prompts": 16}, "threads": 2,
    "model": "SmolLM2-135M-Instruct", "dtype": "float32",
    "offline_tokens_per_s": 60.0, "hf_offline_tokens_per_s": 30.0, "throughput_ratio_vs_hf": 2.0,
    "cpu_time_ratio_vs_hf": 1.9, "single_stream_tokens_per_s": 20.0,
    "hf_single_stream_tokens_per_s": 15.0, "prefill_tokens_per_s": {"512": 500.0},
    "roofline_tokens_per_s_batch1": 40.0, "roofline_fraction_batch1": 0.5,
    "vllm_cpu_offline_tokens_per_s": None, "throughput_ratio_vs_vllm_cpu": None,
    "hf": {"offline": {}},
    "peers": {"llama_cpp": {"weights": "Q4_1 (GGUF)", "single": {"tokens_per_s": 100.0},
                            "prefill": {"512": {"tokens_per_s": 300.0}}}},
}


def test_engine_comparison_summary():
    s = serve_engine.summary(ENGINE_RESULT)
    assert s["throughput_ratio_vs_hf"] == 2.0 and s["roofline_fraction_batch1"] == 0.5
    assert s["llama_cpp"] == "ran" and s["llama_cpp_single_stream_tokens_per_s"] == 100.0
    assert s["llama_cpp_prefill_tokens_per_s"] == {"512": 300.0}
    assert s["single_stream_ratio_vs_llama_cpp"] == 0.2
    assert s["sizes"] == "medium" and s["errors"] == {}
    failed = dict(ENGINE_RESULT, peers={"llama_cpp": {"error": "boom"}})
    assert serve_engine.summary(failed)["errors"] == {"llama_cpp": "boom"}
    assert serve_engine.summary(failed)["llama_cpp"] == "failed"
    assert serve_engine.peers_env("none") == "0" and serve_engine.peers_env("all") == "1"
    assert serve_engine.peers_env("llama_cpp") == "llama_cpp"


def test_engine_comparison_runs_bench_engine_in_a_subprocess(monkeypatch):
    import subprocess
    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(cmd=cmd, env=kwargs["env"])
        out = "the table\n" + json.dumps(ENGINE_RESULT) + "\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=out)

    monkeypatch.setattr(serve_engine.subprocess, "run", fake_run)
    r = serve_engine.run_engine_compare("quick", "llama_cpp")
    assert seen["cmd"][1:] == ["-m", "cluster.cli", "bench", "engine", "--json"]
    assert seen["env"]["PDSERVE_BENCH_SIZES"] == "quick"
    assert seen["env"]["PDSERVE_BENCH_PEERS"] == "llama_cpp"
    assert r["table"] == "the table" and r["throughput_ratio_vs_hf"] == 2.0
    monkeypatch.setattr(serve_engine.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, stdout=""))
    assert "error" in serve_engine.run_engine_compare("quick", "none")
    with pytest.raises(ValueError):
        serve_engine.run_engine_compare("huge")


# -- workloads ----------------------------------------------------------------------------

def test_length_distributions():
    rng = np.random.default_rng(0)
    assert LengthDist.parse("512").sample(rng, 3) == [512] * 3
    assert LengthDist.parse("fixed:7") == LengthDist("fixed", 7)
    u = LengthDist.parse("uniform:10:20").sample(rng, 500)
    assert min(u) == 10 and max(u) == 20
    chat = LengthDist.parse("chat:100:1000").sample(np.random.default_rng(1), 4000)
    assert min(chat) >= 4 and max(chat) == 1000
    assert 85 <= float(np.median(chat)) <= 115  # the median
    assert np.percentile(chat, 99) > 5 * np.median(chat)  # a long tail
    for bad in ("", "x", "uniform:5", "uniform:9:3", "0", "chat:a:b"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_arrivals_are_seeded_poisson_or_gamma():
    offsets = arrival_offsets(20_001, 4.0, np.random.default_rng(3))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: cv 1
    bursty = np.diff(arrival_offsets(20_001, 4.0, np.random.default_rng(3), burstiness=0.25))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # cv = 1/sqrt(shape)
    assert arrival_offsets(3, math.inf, np.random.default_rng(0)) == [0.0, 0.0, 0.0]
    assert 80 <= count_for_duration(20.0, 5.0, np.random.default_rng(0)) <= 120
    with pytest.raises(ValueError):
        arrival_offsets(2, 0.0, np.random.default_rng(0))


def test_requests_are_the_same_for_every_layout():
    w = PRESETS["prefill-heavy"]
    a, b = make_requests(w, 0.5, seed=7), make_requests(w, 0.5, seed=7)
    assert a == b and len(a) == w.num_requests
    assert make_requests(w, 1.0, seed=7) != a and make_requests(w, 0.5, seed=8) != a
    assert all(256 <= r.prompt_len <= 512 and len(r.prompt_token_ids) == r.prompt_len
               and r.output_len == 12 for r in a)
    assert all(1000 <= t < 32000 for r in a for t in r.prompt_token_ids)
    assert len({r.prompt_token_ids[:8] for r in a}) == len(a)  # no shared prefixes
    text = make_requests(w, 0.5, seed=7, num_requests=2, text=True)
    assert text[0].prompt_text and not text[0].prompt_token_ids
    assert len(make_requests(w, 2.0, seed=7, duration_s=5.0)) > 1


def test_interference_requests():
    for scenario in (INTERFERENCE, INTERFERENCE_QUICK):
        alone, n = make_interference_requests(scenario, 0, with_long=False)
        mixed, m = make_interference_requests(scenario, 0, with_long=True)
        assert n == m == scenario.stream.num_requests and mixed[:n] == alone
        longs = mixed[n:]
        assert [r.index for r in longs] == list(range(n, n + scenario.long.num_requests))
        last = alone[-1].send_at
        assert all(scenario.long_start_s <= r.send_at <= max(last, scenario.long_start_s)
                   for r in longs)
        assert all(r.output_len > 4 * max(x.output_len for x in longs) for r in alone)
        assert all(r.prompt_len >= 8 * max(x.prompt_len for x in alone) for r in longs)
    full, n = make_interference_requests(INTERFERENCE, 0, with_long=True)
    assert all(1024 <= r.prompt_len <= 2048 for r in full[n:])
    offsets = [r.send_at for r in full[n:]]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert len(make_interference_requests(INTERFERENCE, 0, False, num_stream=3)[0]) == 3


def _args(*argv: str) -> argparse.Namespace:
    return serve_bench.build_parser().parse_args(list(argv))


def test_arguments_and_workload_plan():
    args = _args()
    assert args.address is None and args.layouts == "disaggregated,colocated"
    plan = serve_bench.workloads(args)
    assert [(w.name, rates) for w, rates in plan] == [("prefill-heavy", (0.6, 1.0)),
                                                      ("decode-heavy", (2.0, 3.5))]
    plan = serve_bench.workloads(_args("--quick", "--workload", "chat", "--rate", "3",
                                       "--num-requests", "5"))
    assert [(w.name, rates, w.num_requests) for w, rates in plan] == [("chat", (3.0,), 5)]
    [(custom, rates)] = serve_bench.workloads(_args("--prompt-len", "100", "--output-len",
                                                    "uniform:1:9"))
    assert custom.name == "custom" and str(custom.prompt) == "100"
    assert str(custom.output) == "uniform:1:9" and rates == (1.0,)
    assert serve_bench.interference_plan(args) is INTERFERENCE  # in the default plan
    assert serve_bench.interference_plan(_args("--quick")) is INTERFERENCE_QUICK
    assert serve_bench.interference_plan(_args("--prompt-len", "100")) is None
    only = _args("--workload", "interference")
    assert serve_bench.workloads(only) == [] and serve_bench.interference_plan(only)
    assert serve_bench.engine_compare_wanted(args)
    assert not serve_bench.engine_compare_wanted(_args("--address", "h:1"))
    assert not serve_bench.engine_compare_wanted(_args("--no-engine-compare"))
    assert serve_bench.engine_compare_wanted(_args("--address", "h:1", "--engine-compare"))
    assert _args("--plots-dir", "docs/bench").plots_dir == "docs/bench"


# -- end to end ---------------------------------------------------------------------------

SMALL_COLOCATED = """mode: colocated
router: {port: 0, num_cpus: 0}
metrics: {port: 0}
colocated: {replicas: 1, num_cpus: 0.5, kv_blocks: 128, price_per_hour: 0.045}
"""


@pytest.mark.slow
def test_quick_run_against_a_small_colocated_deployment(ray_local, tmp_path, capsys):
    spec = tmp_path / "colocated.yaml"
    spec.write_text(SMALL_COLOCATED)
    out_dir, plots_dir = tmp_path / "out", tmp_path / "plots"
    args = _args("--quick", "--layouts", "colocated", "--colocated-spec", str(spec),
                 "--num-requests", "3", "--json", "--no-progress", "--output-dir", str(out_dir),
                 "--plots-dir", str(plots_dir), "--no-engine-compare")
    assert serve_bench.main(args) == 0
    stdout = capsys.readouterr().out
    result = json.loads(stdout.strip().splitlines()[-1])
    runs = result["layouts"]["colocated"]["runs"]
    assert [(r["workload"], r["completed"], r["failed"]) for r in runs] == [
        ("prefill-heavy", 3, 0), ("decode-heavy", 3, 0)]
    assert all(r["output_tokens"] == 3 * int(r["output_len"]) for r in runs)
    for r in runs:
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert 0 < r[metric]["p50"] <= r[metric]["p99"]
    assert result["cost_per_mtok"]["colocated"] > 0
    assert result["layouts"]["colocated"]["cost_per_hour"] == 0.045
    assert result["goodput_ratio_disagg_vs_colocated"] is None  # one layout only
    saved = json.loads((out_dir / "results.json").read_text())
    assert len(saved["layouts"]["colocated"]["runs"][0]["records"]) == 3
    assert sorted(p.name for p in plots_dir.glob("*.png")) == [
        "goodput_vs_rate.png", "interference_tpot.png", "latency_cdf_decode-heavy.png",
        "latency_cdf_prefill-heavy.png"]
    assert not list(out_dir.glob("*.png"))
    # decode interference: the 3-request stream alone, then with 2 long prompts among it
    inter = result["interference"]["colocated"]
    assert inter["stream"]["num_requests"] == 3 and inter["long_prompts"]["num_requests"] == 2
    assert inter["stream_failed"] == {"alone": 0, "with_long_prompts": 0}
    for key in ("tpot_p99_alone", "tpot_p99_with_long_prompts", "tpot_p99_interference"):
        assert inter[key] > 0, key
    assert inter["tpot_p99_interference"] == pytest.approx(
        inter["tpot_p99_with_long_prompts"] / inter["tpot_p99_alone"])
    assert result["tpot_p99_interference"] == {"colocated": inter["tpot_p99_interference"]}
    phases = saved["layouts"]["colocated"]["interference"]
    assert phases["alone"]["completed"] == 3 and len(phases["alone"]["records"]) == 3
    assert len(phases["with_long_prompts"]["records"]) == 5
    assert phases["with_long_prompts"]["long_prompts"]["completed"] == 2
    assert result["engine_comparison"] is None  # --no-engine-compare
    assert "tpot_p99_interference_disaggregated" not in result["goals"]
    assert "decode interference" in stdout and "goal" in stdout
