"""llama.cpp peer of `pdserve bench engine`; runs in .peers/llamacpp (llama-cpp-python).

    .peers/llamacpp/bin/python benchmarks/peers/llamacpp_runner.py MODEL.gguf --spec SPEC.json
        --threads N [--single-tokens 128] [--repeats 2] [--no-prefill]

MODEL.gguf is the file the default model is converted from (Q4_1 weights, so its bytes per
token are ~5x fewer than our fp32: a reference point, not a like-for-like figure). SPEC.json is
the bench's prompt file (see benchmarks/hf_runner.py). Prints ONE JSON line on stdout:
{"runner": "llamacpp", ...}.
  - single-stream decode: batch 1, greedy (top_k=1), tokens/s between the first and the N-th
    token yielded by `Llama.generate` (which does not stop at EOS), best of --repeats;
  - prefill: `Llama.eval` over the prompt after a reset, best of --repeats.
There is no offline batch figure: llama-cpp-python runs one sequence at a time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--no-prefill", action="store_true")
    args = ap.parse_args()

    with open(args.spec) as f:
        spec = json.load(f)
    import llama_cpp
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.n_ctx, n_batch=512,
                          n_threads=args.threads, n_threads_batch=args.threads,
                          seed=0, verbose=False)
    result: dict = {"runner": "llamacpp", "llama_cpp": llama_cpp.__version__,
                    "threads": args.threads, "load_s": round(time.perf_counter() - t0, 3),
                    "weights": "Q4_1 (GGUF)"}

    def stream(prompt: list[int], n: int) -> dict:
        llm.reset()
        t = time.perf_counter()
        stamps = []
        tokens = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(tok)
            if len(tokens) == n:
                break
        return {"tokens_per_s": (n - 1) / (stamps[-1] - stamps[0]), "ttft_s": stamps[0] - t,
                "elapsed_s": stamps[-1] - t, "output_tokens": len(tokens)}

    stream(spec["warmup"][0], 4)
    runs = [stream(p, args.single_tokens) for p in spec["single"][:args.repeats]]
    result["single"] = max(runs, key=lambda r: r["tokens_per_s"])

    if not args.no_prefill:
        result["prefill"] = {}
        for length, variants in spec["prefill"].items():
            if int(length) >= args.n_ctx:
                continue
            best = None
            for prompt in variants[:args.repeats]:
                llm.reset()
                t = time.perf_counter()
                llm.eval(prompt)
                dt = time.perf_counter() - t
                best = dt if best is None else min(best, dt)
            result["prefill"][length] = {"tokens_per_s": int(length) / best, "elapsed_s": best}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
