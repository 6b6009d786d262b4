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


def cmd_generate_remote(args: argparse.Namespace) -> int:
    """Streams a completion from a running cluster over gRPC."""
    import asyncio

    from cluster.client import channel, sampling_message, stream_generate
    from protos import pdserve_pb2 as pb
    from protos import pdserve_pb2_grpc as pb_grpc

    sampling = sampling_message(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                                ignore_eos=args.ignore_eos)
    if args.chat:
        request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=args.prompt)],
                                     sampling=sampling)
    else:
        request = pb.GenerateRequest(prompt=args.prompt, sampling=sampling)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None

    async def run():
        async with channel(args.address) as ch:
            printer = None if args.json else (lambda m: print(m.text, end="", flush=True))
            return await stream_generate(pb_grpc.GenerationStub(ch), request, metadata=metadata,
                                         on_message=printer)

    import grpc
    try:
        result = asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        print(f"pdserve: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason, "usage": result.usage,
                          "ttft_s": result.ttft_s, "seconds": round(result.e2e_s, 3)}))
    else:
        print(f"\n[{len(result.token_ids)} tokens in {result.e2e_s:.2f}s, "
              f"finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def _load_spec(path):
    from cluster.spec import load_spec
    spec = load_spec(path)
    for warning in spec.warnings:
        print(f"pdserve: warning: {warning}", file=sys.stderr)
    return spec


def _how_to_send(address: str) -> str:
    return (f"pdserve is serving on {address}\n"
            f"  send a request:  pdserve generate --address {address} --chat \"Hello!\"\n"
            f"  or with grpcurl: grpcurl -plaintext -d '{{\"prompt\": \"Hello\"}}' {address} "
            f"pdserve.v1.Generation/Generate")


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.local import serve
    spec = _load_spec(args.spec)

    def ready(status):
        print(_how_to_send(status["address"]), flush=True)
        print(f"  metrics:         {status['metrics']}\n  stop:            Ctrl-C or `pdserve down`",
              flush=True)

    serve(spec, on_ready=ready)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import os

    from cluster import local
    spec = _load_spec(args.spec)
    if os.environ.get("RAY_ADDRESS"):
        local.connect()
        _, status = local.deploy(spec, detached=True)
        address = status["address"]
    else:
        address = local.up_background(args.spec)["address"]
    print(_how_to_send(address))
    return 0


def _controller():
    from cluster import local
    from cluster.controller import get_controller
    ray = local.connect()
    return ray, get_controller()


def cmd_status(args: argparse.Namespace) -> int:
    ray, controller = _controller()
    status = ray.get(controller.status.remote(), timeout=60)
    if args.json:
        print(json.dumps(status, default=str))
        return 0
    print(f"address {status['address']}  metrics {status['metrics']}  mode {status['mode']}")
    for name, pool in status["pools"].items():
        print(f"{name}: {pool['replicas']} replicas (target {pool['target']})")
        for w in pool["workers"]:
            print(f"  {w['worker_id']:<12} pid {w.get('pid')}  node {str(w.get('node_id'))[:12]}  "
                  f"queue {w.get('queue_depth', w.get('waiting', 0))}  running {w.get('running', 0)}  "
                  f"kv {w.get('kv_blocks_used', 0)}/{w.get('kv_blocks_total', 0)}"
                  f"{'  draining' if w.get('draining') else ''}{'' if w.get('alive') else '  DEAD'}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    replicas = {k: v for k, v in (("prefill", args.prefill), ("decode", args.decode),
                                  ("colocated", args.colocated)) if v is not None}
    if not replicas:
        raise ValueError("scale: give --prefill N, --decode M or --colocated K")
    ray, controller = _controller()
    status = ray.get(controller.scale.remote(replicas), timeout=1800)
    print(", ".join(f"{n}: {p['replicas']}" for n, p in status["pools"].items()))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    import os

    from cluster import local
    if local.down():
        print("pdserve stopped")
        return 0
    if os.environ.get("RAY_ADDRESS"):
        ray, controller = _controller()
        ray.get(controller.shutdown.remote(), timeout=120)
        ray.kill(controller)
        print("pdserve stopped")
        return 0
    print("pdserve: no service is running here", file=sys.stderr)
    return 1


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
    gen.add_argument("--address", help="HOST:PORT of a running cluster (default: run in-process)")
    gen.add_argument("--api-key", help="for a cluster that requires one")
    _add_sampling_args(gen)
    gen.set_defaults(func=lambda a: cmd_generate_remote(a) if a.address else cmd_generate(a))

    up = sub.add_parser("up", help="start the cluster in the background (or on RAY_ADDRESS)")
    up.add_argument("spec", nargs="?", help="YAML spec (default deploy/local.yaml)")
    up.set_defaults(func=cmd_up)
    srv = sub.add_parser("serve", help="start the cluster and serve in the foreground")
    srv.add_argument("spec", nargs="?", help="YAML spec (default deploy/local.yaml)")
    srv.set_defaults(func=cmd_serve)
    st = sub.add_parser("status", help="pools, workers, queues and KV usage")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    sc = sub.add_parser("scale", help="change pool sizes live (drains removed workers)")
    sc.add_argument("--prefill", type=int)
    sc.add_argument("--decode", type=int)
    sc.add_argument("--colocated", type=int)
    sc.set_defaults(func=cmd_scale)
    dn = sub.add_parser("down", help="stop the cluster")
    dn.set_defaults(func=cmd_down)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    eng = bench_sub.add_parser("engine", help="engine throughput vs HF transformers and peers")
    eng.add_argument("--json", action="store_true")
    eng.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    eng.add_argument("--no-peers", action="store_true", help="skip vLLM-CPU / llama.cpp")
    eng.set_defaults(func=lambda a: __import__("benchmarks.engine_bench", fromlist=["main"]).main(a))
    sv = bench_sub.add_parser("serve", help="online serving benchmark: disaggregated vs colocated")
    __import__("benchmarks.serve_bench", fromlist=["add_arguments"]).add_arguments(sv)
    sv.set_defaults(func=lambda a: __import__("benchmarks.serve_bench", fromlist=["main"]).main(a))
    tr = bench_sub.add_parser("transfer", help="KV transfer GB/s vs a raw socket; TTFT overhead")
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    tr.set_defaults(func=lambda a: __import__("benchmarks.transfer_bench", fromlist=["main"]).main(a))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, ModelLoadError, ValueError, RuntimeError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
