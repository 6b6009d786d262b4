"""Linear-layer micro-benchmark: the float32 maths of engine/kernels/linear.py side by side.

    .venv/bin/python -m benchmarks.linear_bench [--threads 2] [--rows 1 16 64 256 2048]
                                                [--layers 30] [--json]

One pass is what a forward step does in its linears: for each of --layers layers of the default
model (SmolLM2-135M: hidden 576, 9 + 2 x 3 heads of 64, MLP 1536), the fused QKV projection,
o_proj, the gated gate_up projection (silu(gate) * up) and down_proj, on x of --rows rows.
Every layer has its own random weights, so they stream from memory as across a real step.
Maths (PDSERVE_FP32_MATMUL; the AMX ones only on a CPU with AMX):
  - torch:  F.linear on the plain weight (MKL/oneDNN sgemm), then silu * up
  - ieee:   the FMA kernel over float32 panels (packed_linear.cpp)
  - bf16x3: the AMX kernel, 2 bf16 parts a value (amx_linear.cpp)
  - bf16x6: the AMX kernel, 3 bf16 parts
Times are the best of --repeats passes; GFLOP/s counts 2 * rows * in * out per projection.
`max_rel_error` is the largest |y - y64| / max|y64| of one layer's projections against float64.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_util import env_set

HIDDEN, INTERMEDIATE, QKV_OUT = 576, 1536, 576 + 2 * 192
MATHS = ("torch", "ieee", "bf16x3", "bf16x6")


def layer_weights(layers: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * shape[1] ** -0.5  # noqa: E731
    return [{"qkv": rand(QKV_OUT, HIDDEN), "o": rand(HIDDEN, HIDDEN),
             "gate_up": rand(2 * INTERMEDIATE, HIDDEN), "down": rand(HIDDEN, INTERMEDIATE)}
            for _ in range(layers)]


def build(math: str, weights: list[dict[str, torch.Tensor]]):
    """The layers' Linear/GatedLinear objects under one math (None: not available here)."""
    from engine.kernels import cpu_ops
    from engine.kernels.linear import GatedLinear, Linear

    if math != "torch" and not cpu_ops.available():
        return None
    if math in ("bf16x3", "bf16x6") and not cpu_ops.amx_available():
        return None
    setting = (dict(PDSERVE_LINEAR="torch") if math == "torch"
               else dict(PDSERVE_LINEAR=None, PDSERVE_FP32_MATMUL=math))
    with env_set(**setting):
        return [{"qkv": Linear(w["qkv"]), "o": Linear(w["o"]), "gate_up": GatedLinear(w["gate_up"]),
                 "down": Linear(w["down"])} for w in weights]


def one_pass(layers, x_hidden: torch.Tensor, x_inner: torch.Tensor) -> None:
    for lin in layers:
        lin["qkv"](x_hidden)
        lin["o"](x_hidden)
        lin["gate_up"](x_hidden)
        lin["down"](x_inner)


def pass_flops(rows: int, layers: int) -> int:
    per_layer = HIDDEN * (QKV_OUT + HIDDEN + 2 * INTERMEDIATE) + INTERMEDIATE * HIDDEN
    return 2 * rows * per_layer * layers


def max_rel_error(layer, weights: dict[str, torch.Tensor], rows: int = 16) -> float:
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for name, w in weights.items():
        x = torch.randn(rows, w.shape[1], generator=gen)
        want = F.linear(x.double(), w.double())
        if name == "gate_up":
            gate, up = want.chunk(2, dim=-1)
            want = F.silu(gate) * up
        got = layer[name](x).double()
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    return worst


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = layer_weights(args.layers)
    gen = torch.Generator().manual_seed(2)
    results: dict[str, dict] = {}
    for math in MATHS:
        layers = build(math, weights)
        if layers is None:
            continue
        entry = {"max_rel_error": max_rel_error(layers[0], weights[0]), "rows": {}}
        for rows in args.rows:
            x_hidden, x_inner = torch.randn(rows, HIDDEN, generator=gen), torch.randn(rows, INTERMEDIATE, generator=gen)
            one_pass(layers, x_hidden, x_inner)  # warm-up
            best = float("inf")
            for _ in range(args.repeats if rows < 1024 else 1):
                t = time.perf_counter()
                one_pass(layers, x_hidden, x_inner)
                best = min(best, time.perf_counter() - t)
            entry["rows"][str(rows)] = {"ms": best * 1e3, "gflops": pass_flops(rows, args.layers) / best / 1e9}
        results[math] = entry
        del layers
    for entry in results.values():
        for rows, r in entry["rows"].items():
            for base in ("torch", "ieee"):
                if base in results:
                    r[f"speedup_vs_{base}"] = results[base]["rows"][rows]["ms"] / r["ms"]
    result = {"bench": "linear", "threads": args.threads, "layers": args.layers, "maths": results}
    print(render(result))
    if args.json:
        print(json.dumps(result))
    return result


def render(result: dict) -> str:
    maths = result["maths"]
    lines = [f"linear layers of {result['layers']} SmolLM2-135M layers, {result['threads']} threads: "
             "ms per pass (GFLOP/s, speed-up vs torch / vs ieee)"]
    rows = next(iter(maths.values()))["rows"] if maths else {}
    lines.append("math    max rel err  " + "".join(f"{r + ' rows':>30}" for r in rows))
    for math, entry in maths.items():
        cells = "".join(
            f"{v['ms']:>9.1f} ({v['gflops']:>4.0f}, {v.get('speedup_vs_torch', 0):.2f}/"
            f"{v.get('speedup_vs_ieee', 0):.2f})".rjust(30) for v in entry["rows"].values())
        lines.append(f"{math:<7} {entry['max_rel_error']:>11.1e}  {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
