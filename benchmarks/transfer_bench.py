"""`pdserve bench transfer`: what moving KV costs.

1. Link speed: 1..256 MiB over the shipped UCX link next to a raw loopback socket moving
   the same bytes between the same two processes, in the same run (ratio printed).
2. End to end: TTFT of prefill + layer-wise transfer into a decode process's paged cache
   (overlapped with compute) versus the same prefill with no transfer, for 512- and
   2048-token prompts. Prefix caching is off so every run computes the whole prompt.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time

from benchmarks import transfer_link_bench as link_bench

MiB = 1 << 20


def _decode_process(pipe, block_size: int) -> None:
    """Child: a decode engine + UCX listener; leases on request, frees after READY."""
    from decode_worker.core import DecodeCore
    from engine.config import CacheConfig, EngineConfig
    from kv_transfer.factory import listener_factory
    core = DecodeCore(EngineConfig(cache=CacheConfig(block_size, 512, False), num_threads=1),
                      listener_factory("ucx", "127.0.0.1"))
    pipe.send("ready")
    while (cmd := pipe.recv()) != "stop":
        op, rid, n = cmd
        if op == "reserve":
            pipe.send(core.reserve(rid, n))
        else:  # "release": the transfer must have landed; give the blocks back
            state = core.receiver.wait(rid, 60)
            blocks, _ = core.receiver.take(rid)
            core.engine.release_blocks(blocks)
            pipe.send(state.name)
    core.close()


def ttft_overhead(prompt_lens=(512, 2048), reps: int = 3) -> dict:
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.sampling_params import SamplingParams
    from kv_transfer.factory import make_link
    from prefill_worker.core import PrefillCore

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_process, args=(child, 16), daemon=True)
    proc.start()
    try:
        assert parent.poll(300) and parent.recv() == "ready", "decode process did not start"
        cfg = EngineConfig(cache=CacheConfig(16, 512, False),
                           scheduler=SchedulerConfig(max_num_batched_tokens=4096))
        prefill = PrefillCore(cfg, make_link("ucx", "127.0.0.1"))
        params = SamplingParams(max_tokens=1, temperature=0)
        out = {}
        for n in prompt_lens:
            prompt = [(i * 7919) % 40000 + 100 for i in range(n)]
            alone, moved = [], []
            for rep in range(reps + 1):  # the first round warms up
                with prefill.lock:  # the core's loop thread must not step meanwhile
                    start = time.perf_counter()
                    prefill.engine.generate([prompt], params)
                    t_alone = time.perf_counter() - start
                rid = f"bench-{n}-{rep}"
                parent.send(("reserve", rid, n))
                lease = parent.recv()
                start = time.perf_counter()
                prefill.prefill(rid, prompt, params, lease, timeout_s=300)
                t_moved = time.perf_counter() - start
                parent.send(("release", rid, n))
                assert parent.recv() == "READY"
                if rep:
                    alone.append(t_alone)
                    moved.append(t_moved)
            a, m = statistics.median(alone), statistics.median(moved)
            kv_bytes = n * prefill.engine.kv.bytes_per_token
            out[n] = dict(prefill_s=a, prefill_and_transfer_s=m, overhead=m / a - 1,
                          kv_mib=kv_bytes / MiB)
        prefill.close()
        return out
    finally:
        parent.send("stop")
        proc.join(20)
        if proc.is_alive():
            proc.kill()


def main(args) -> int:
    sizes = [1, 16, 64] if args.quick else list(link_bench.SIZES_MIB)
    configs = {link_bench.SHIPPED: link_bench.CONFIGS[link_bench.SHIPPED]}
    link = link_bench.run(configs, [s * MiB for s in sizes], 2 if args.quick else 5, 600)
    print("link: GB/s over loopback, same bytes, same processes")
    rows = _link_rows(link, sizes)
    for size, ucx, sock in rows:
        print(f"  {size:>4} MiB  ucx {ucx:5.2f}  socket {sock:5.2f}  ratio {ucx / sock:4.2f}")
    lens = (128, 512) if args.quick else (512, 2048)
    ttft = ttft_overhead(lens, reps=1 if args.quick else 3)
    print("TTFT: prefill alone vs prefill + layer-wise KV transfer to a decode process")
    for n, r in ttft.items():
        print(f"  {n:>5} tokens ({r['kv_mib']:.0f} MiB KV): {r['prefill_s'] * 1e3:7.1f} ms -> "
              f"{r['prefill_and_transfer_s'] * 1e3:7.1f} ms  overhead {r['overhead'] * 100:+.1f} %")
    ratio_64 = next((u / s for size, u, s in rows if size == 64), None)
    summary = dict(link_gbps={str(size): dict(ucx=u, socket=s, ratio=u / s) for size, u, s in rows},
                   ratio_vs_socket=ratio_64, ttft={str(n): r for n, r in ttft.items()},
                   ttft_overhead=ttft[max(ttft)]["overhead"])
    if args.json:
        print(json.dumps(summary))
    return 0


def _link_rows(result: dict, sizes: list[int]) -> list[tuple[int, float, float]]:
    """(MiB, ucx GB/s, socket GB/s) from transfer_link_bench.run's result."""
    return [(size, result[link_bench.SHIPPED][size * MiB]["gbs"], result["socket"][size * MiB]["gbs"])
            for size in sizes]
