"""`pdserve` command line: one sub-command per user action."""
from __future__ import annotations

import argparse
import json
import sys
import time

from engine.config import ConfigError
from engine.loader import ModelLoadError


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace):
    from engine.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace) -> int:
    """Runs the engine in this process and streams one completion to stdout."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    params = _sampling_params(args)
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device))
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    start = time.perf_counter()
    request_id = engine.add_request(prompt, params)
    token_ids, pieces, reason = [], [], None
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            token_ids += out.new_token_ids
            pieces.append(out.new_text)
            if not args.json:
                print(out.new_text, end="", flush=True)
            if out.finished:
                reason = out.finish_reason.value if out.finish_reason else None
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"text": "".join(pieces), "token_ids": token_ids, "finish_reason": reason,
                          "num_prompt_tokens": len(engine.tokenizer.encode(prompt)),
                          "seconds": round(elapsed, 3)}))
    else:
        print(f"\n[{len(token_ids)} tokens in {elapsed:.2f}s, finish: {reason}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="default",
                     help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file or a HF directory")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    eng = bench_sub.add_parser("engine", help="engine throughput vs HF transformers and peers")
    eng.add_argument("--json", action="store_true")
    eng.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    eng.set_defaults(func=lambda a: __import__("benchmarks.engine_bench", fromlist=["main"]).main(a))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, ModelLoadError, ValueError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
