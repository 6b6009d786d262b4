"""HF transformers side of `pdserve bench engine`, run as a subprocess of the bench.

    python benchmarks/hf_runner.py MODEL_DIR --spec SPEC.json --threads N [--max-tokens 128]
        [--single-tokens 128] [--repeats 2]

SPEC.json (written by benchmarks/engine_bench.py) holds the token-id prompts:
    {"warmup": [[...]], "offline": [[...], ...], "single": [[...], ...],
     "prefill": {"512": [[...], ...], ...}}
Lists hold one distinct prompt per repetition, so no engine gets a cache hit.

Prints ONE JSON line on stdout: {"runner": "hf", ...}. Measures, with the model in
fp32 on CPU and `torch.set_num_threads(N)`:
  - offline: one batched `generate` over every prompt, left-padded, greedy (once per prompt
    batch of the spec: "offline" then "offline_repeats"; the fastest run counts),
    exactly --max-tokens new tokens each (min_new_tokens = max_new_tokens);
  - single-stream decode: batch 1, tokens/s between the first and last new token
    (timed by a streamer), best of --repeats;
  - prefill: one forward over the prompt (logits of the last position only), best of --repeats.
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--pad-id", type=int, default=2)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import transformers
    from transformers.generation.streamers import BaseStreamer

    from benchmarks.bench_util import best_offline_run

    with open(args.spec) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    def batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), args.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        return ids, mask

    def generate(prompts, n, streamer=None):
        ids, mask = batch(prompts)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=args.pad_id, streamer=streamer)
        return out[:, ids.shape[1]:]

    class Stamps(BaseStreamer):
        """Timestamps of each `put`: the first put is the prompt, then one per new token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    result: dict = {"runner": "hf", "transformers": transformers.__version__,
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_s": round(load_s, 3)}
    with torch.inference_mode():
        generate(spec["warmup"], 4)

        runs = []
        for prompts in [spec["offline"], *spec.get("offline_repeats", [])]:
            t, cpu = time.perf_counter(), time.process_time()
            out = generate(prompts, args.max_tokens)
            elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
            n_out = int(out.shape[0] * out.shape[1])
            runs.append({"tokens_per_s": n_out / elapsed, "elapsed_s": elapsed, "cpu_s": cpu,
                         "num_prompts": len(prompts), "output_tokens": n_out,
                         "first_tokens": out[:, :16].tolist()})
        result["offline"] = best_offline_run(runs)

        best = None
        for prompt in spec["single"][:args.repeats]:
            stamps = Stamps()
            t = time.perf_counter()
            out = generate([prompt], args.single_tokens, stamps)
            total = time.perf_counter() - t
            tok = stamps.times[1:]  # drop the prompt's put
            if len(tok) < 2 or out.shape[1] != args.single_tokens:
                raise RuntimeError(f"single-stream produced {out.shape[1]} tokens, {len(tok)} stamps")
            run = {"tokens_per_s": (len(tok) - 1) / (tok[-1] - tok[0]), "ttft_s": tok[0] - t,
                   "elapsed_s": total, "output_tokens": int(out.shape[1])}
            if best is None or run["tokens_per_s"] > best["tokens_per_s"]:
                best = run
        result["single"] = best

        result["prefill"] = {}
        for length, variants in spec["prefill"].items():
            best_s = None
            for prompt in variants[:args.repeats]:
                t = time.perf_counter()
                model(torch.tensor([prompt]), logits_to_keep=1)
                dt = time.perf_counter() - t
                best_s = dt if best_s is None else min(best_s, dt)
            result["prefill"][length] = {"tokens_per_s": int(length) / best_s, "elapsed_s": best_s}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
