"""The comparison and the printed tables of `pdserve bench serve`."""
from __future__ import annotations

from collections.abc import Mapping

from benchmarks.serve_metrics import ratio

DISAGG, COLOC = "disaggregated", "colocated"


def _runs_by_key(layout: Mapping) -> dict[tuple[str, float], dict]:
    return {(r["workload"], r["rate"]): r for r in layout["runs"]}


def compare(layouts: Mapping[str, Mapping]) -> dict:
    """Disaggregated over colocated, per (workload, rate), per workload and overall (sums of
    goodput over the rates). A figure is None when the run did not benchmark both layouts
    or the colocated figure is 0 or missing."""
    out: dict = {"by_run": {}, "goodput_ratio_by_workload": {},
                 "goodput_ratio_by_tpot_slo": {}, "goodput_ratio_disagg_vs_colocated": None,
                 "cost_per_mtok_ratio_disagg_vs_colocated": None,
                 "cost_per_mtok_at_slo_ratio_disagg_vs_colocated": None}
    if DISAGG not in layouts or COLOC not in layouts:
        return out
    d_total, c_total = layouts[DISAGG].get("total") or {}, layouts[COLOC].get("total") or {}
    for key in ("cost_per_mtok", "cost_per_mtok_at_slo"):
        out[f"{key}_ratio_disagg_vs_colocated"] = ratio(d_total.get(key), c_total.get(key))
    d_runs, c_runs = _runs_by_key(layouts[DISAGG]), _runs_by_key(layouts[COLOC])
    sums: dict[str, list[float]] = {}
    grid: dict[str, dict[str, list[float]]] = {}  # workload -> TPOT SLO -> [disagg, coloc]
    for key in d_runs.keys() & c_runs.keys():
        d, c = d_runs[key], c_runs[key]
        workload, rate = key
        out["by_run"].setdefault(workload, {})[f"{rate:g}"] = {
            "goodput": ratio(d["goodput"], c["goodput"]),
            "ttft_p50": ratio(d["ttft_s"]["p50"], c["ttft_s"]["p50"]),
            "ttft_p99": ratio(d["ttft_s"]["p99"], c["ttft_s"]["p99"]),
            "tpot_p50": ratio(d["tpot_s"]["p50"], c["tpot_s"]["p50"]),
            "tpot_p99": ratio(d["tpot_s"]["p99"], c["tpot_s"]["p99"]),
            "e2e_p50": ratio(d["e2e_s"]["p50"], c["e2e_s"]["p50"]),
            "output_throughput": ratio(d["output_throughput"], c["output_throughput"]),
            "cost_per_mtok": ratio(d["cost_per_mtok"], c["cost_per_mtok"]),
            "cost_per_mtok_at_slo": ratio(d["cost_per_mtok_at_slo"], c["cost_per_mtok_at_slo"]),
        }
        s = sums.setdefault(workload, [0.0, 0.0])
        s[0] += d["goodput"]
        s[1] += c["goodput"]
        for slo, good in d.get("goodput_by_tpot_slo", {}).items():
            g = grid.setdefault(workload, {}).setdefault(slo, [0.0, 0.0])
            g[0] += good
            g[1] += c["goodput_by_tpot_slo"].get(slo, 0.0)
    out["goodput_ratio_by_workload"] = {w: ratio(d, c) for w, (d, c) in sums.items()}
    out["goodput_ratio_by_tpot_slo"] = {w: {slo: ratio(d, c) for slo, (d, c) in by_slo.items()}
                                        for w, by_slo in grid.items()}
    out["goodput_ratio_disagg_vs_colocated"] = ratio(sum(s[0] for s in sums.values()),
                                                     sum(s[1] for s in sums.values()))
    return out


def _f(value, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def run_table(layouts: Mapping[str, Mapping]) -> str:
    head = (f"{'layout':<14}{'workload':<15}{'rate':>6}{'ok/n':>7}{'TTFT p50':>10}{'p99':>8}"
            f"{'TPOT p50':>10}{'p99':>8}{'ITL p99':>9}{'E2E p50':>9}{'req/s':>7}{'tok/s':>8}"
            f"{'goodput':>9}{'$/Mtok':>8}{'@SLO':>8}")
    lines = [head, "-" * len(head)]
    for name, layout in layouts.items():
        for r in layout["runs"]:
            lines.append(
                f"{name:<14}{r['workload']:<15}{r['rate']:>6g}"
                f"{r['completed']:>4}/{r['requests']:<2}"
                f"{_f(r['ttft_s']['p50']):>10}{_f(r['ttft_s']['p99']):>8}"
                f"{_f(r['tpot_s']['p50']):>10}{_f(r['tpot_s']['p99']):>8}"
                f"{_f(r['itl_s']['p99']):>9}{_f(r['e2e_s']['p50'], '.2f'):>9}"
                f"{r['request_throughput']:>7.2f}{r['output_throughput']:>8.1f}{r['goodput']:>9.3f}"
                f"{_f(r['cost_per_mtok'], '.2f'):>8}{_f(r['cost_per_mtok_at_slo'], '.2f'):>8}")
    return "\n".join(lines)


def ratio_table(comparison: Mapping) -> str:
    if not comparison["by_run"]:
        return "(one layout only, or no run on both: no disaggregated / colocated ratios)"
    cols = {"goodput": "goodput", "ttft_p50": "TTFT p50", "ttft_p99": "TTFT p99",
            "tpot_p50": "TPOT p50", "tpot_p99": "TPOT p99", "output_throughput": "tok/s",
            "cost_per_mtok": "$/Mtok", "cost_per_mtok_at_slo": "$/Mtok@SLO"}
    head = f"{'disagg / coloc':<15}{'rate':>6}" + "".join(f"{c:>12}" for c in cols.values())
    lines = [head, "-" * len(head)]
    for workload, by_rate in comparison["by_run"].items():
        for rate, figures in sorted(by_rate.items(), key=lambda kv: float(kv[0])):
            lines.append(f"{workload:<15}{rate:>6}" + "".join(f"{_f(figures[c], '.2f'):>12}"
                                                              for c in cols))
    for workload, g in comparison["goodput_ratio_by_workload"].items():
        by_slo = comparison["goodput_ratio_by_tpot_slo"].get(workload, {})
        grid = ", ".join(f"{slo}s: {_f(r, '.2f')}" for slo, r in by_slo.items())
        lines.append(f"goodput ratio, {workload}: {_f(g, '.2f')}"
                     + (f"  (by TPOT SLO {grid})" if grid else ""))
    overall = comparison["goodput_ratio_disagg_vs_colocated"]
    lines.append(f"goodput ratio, all runs: {_f(overall, '.2f')}")
    lines.append(f"$/Mtok ratio, all runs: "
                 f"{_f(comparison.get('cost_per_mtok_ratio_disagg_vs_colocated'), '.2f')}, "
                 f"at SLO: {_f(comparison.get('cost_per_mtok_at_slo_ratio_disagg_vs_colocated'), '.2f')}"
                 f"  (goal at SLO < 1: disaggregated is cheaper per good token)")
    return "\n".join(lines)


def cost_table(layouts: Mapping[str, Mapping]) -> str:
    """USD per million output tokens of each layout over all its runs."""
    lines = [f"{'cost over all runs':<20}{'$/hour':>8}{'tok/s':>8}{'$/Mtok':>9}{'@SLO':>9}"]
    for name, layout in layouts.items():
        t = layout["total"]
        lines.append(f"{name:<20}{t['cost_per_hour']:>8.3f}{t['output_throughput']:>8.1f}"
                     f"{_f(t['cost_per_mtok'], '.2f'):>9}{_f(t['cost_per_mtok_at_slo'], '.2f'):>9}")
    return "\n".join(lines)


INTERFERENCE_GOAL = 1.10  # decode's p99 TPOT within 10 % when long prompts arrive


def interference_table(by_layout: Mapping[str, Mapping]) -> str:
    """by_layout: layout -> its interference entry (see serve_metrics.interference)."""
    head = (f"{'decode interference':<20}{'stream':>7}{'long':>6}{'TPOT p99':>10}{'+long':>8}"
            f"{'ratio':>7}{'TPOT p50':>10}{'+long':>8}{'ITL p99':>9}{'+long':>8}{'ratio':>7}"
            f"{'long TTFT p50':>15}")
    lines = [head, "-" * len(head)]
    for name, e in by_layout.items():
        long_ttft = ((e.get("with_long_prompts") or {}).get("long_prompts") or {}).get("ttft_s", {})
        lines.append(
            f"{name:<20}{e['stream']['num_requests']:>7}{e['long_prompts']['num_requests']:>6}"
            f"{_f(e['tpot_p99_alone']):>10}{_f(e['tpot_p99_with_long_prompts']):>8}"
            f"{_f(e['tpot_p99_interference'], '.2f'):>7}"
            f"{_f(e['tpot_p50_alone']):>10}{_f(e['tpot_p50_with_long_prompts']):>8}"
            f"{_f(e['itl_p99_alone']):>9}{_f(e['itl_p99_with_long_prompts']):>8}"
            f"{_f(e['itl_p99_interference'], '.2f'):>7}{_f(long_ttft.get('p50'), '.2f'):>15}")
    lines.append(f"ratio: p99 TPOT of the stream's requests with long prompts arriving / alone "
                 f"(goal <= {INTERFERENCE_GOAL:.2f})")
    return "\n".join(lines)


def goals(result: Mapping) -> dict:
    """The issue's goal figures of one run: name -> {value, goal, met} (met None: unmeasured)."""
    def entry(value, goal: str, met) -> dict:
        return {"value": value, "goal": goal, "met": None if value is None else bool(met(value))}

    engine = result.get("engine_comparison") or {}
    interference = result.get("interference") or {}
    out = {
        # the issue's goal: goodput at a tight TPOT SLO (--tpot-slo) >= 1.5x colocated
        "goodput_ratio_disagg_vs_colocated": entry(
            result.get("goodput_ratio_disagg_vs_colocated"), ">= 1.5", lambda v: v >= 1.5),
        **{f"goodput_ratio_{w}": entry(v, ">= 1.5", lambda v: v >= 1.5)
           for w, v in (result.get("goodput_ratio_by_workload") or {}).items()},
        "cost_per_mtok_at_slo_ratio_disagg_vs_colocated": entry(
            result.get("cost_per_mtok_at_slo_ratio_disagg_vs_colocated"), "< 1",
            lambda v: v < 1),
    }
    if DISAGG in interference:
        out["tpot_p99_interference_disaggregated"] = entry(
            interference[DISAGG].get("tpot_p99_interference"), f"<= {INTERFERENCE_GOAL:.2f}",
            lambda v: v <= INTERFERENCE_GOAL)
    if engine and "error" not in engine:
        out["throughput_ratio_vs_hf"] = entry(engine.get("throughput_ratio_vs_hf"), ">= 2",
                                              lambda v: v >= 2)
        out["roofline_fraction_batch1"] = entry(engine.get("roofline_fraction_batch1"), ">= 0.6",
                                                lambda v: v >= 0.6)
    return out


def goals_table(g: Mapping[str, Mapping]) -> str:
    lines = [f"{'goal':<50}{'value':>8}  {'target':<8}met"]
    for name, e in g.items():
        met = "-" if e["met"] is None else ("yes" if e["met"] else "no")
        lines.append(f"{name:<50}{_f(e['value'], '.3f'):>8}  {e['goal']:<8}{met}")
    return "\n".join(lines)
