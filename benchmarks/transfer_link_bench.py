"""UCX link vs a raw loopback socket, moving the same bytes between two processes.

    python benchmarks/transfer_link_bench.py [--configs default,sm] [--sizes-mib 1,64] [--json]

Two processes are spawned: a receiver (one LinkListener per UCX config, plus a
plain TCP server) and a sender (one LinkSender per config, plus a socket). For
each size the sender goes round-robin over the socket and every config, so all
of them see the same machine noise. A transfer is timed from send until the
receiver's ack (the payload has landed in its preallocated buffer); the
socket does the same (length, sendall, recv_into the buffer, 1-byte ack).
GB/s is bytes / median time; ratio = config median / socket median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1 << 20
SIZES_MIB = (1, 16, 64, 256)
KV_HEADS, HEAD_DIM = 8, 128  # float32 K/V: 8 KiB per token
BYTES_PER_TOKEN = 2 * KV_HEADS * HEAD_DIM * 4
WARMUP_BYTES = 128 * MiB

_PLAIN = dict(tcp_segment_size=None, rndv_scheme=None, rndv_threshold=None)
# Opt-in only: a killed sender can wedge the receiver. put_zcopy would route
# payloads back over tcp, so it is left out.
_SM = dict(shared_memory=True, rndv_scheme=None)
# name -> LinkConfig keyword arguments
CONFIGS: dict[str, dict] = {
    "ucxx-default": _PLAIN,  # UCX as ucxx sets it up: tcp, 8 KiB segments, rndv from 8 KiB
    "tcp-rndv-inf": dict(_PLAIN, rndv_threshold="inf"),  # all eager
    "tcp-seg256k": dict(_PLAIN, tcp_segment_size="256k"),
    "tcp-seg1m": dict(_PLAIN, tcp_segment_size="1m"),
    "tcp-seg1m-put": dict(_PLAIN, tcp_segment_size="1m", rndv_scheme="put_zcopy"),
    "tcp-seg4m-put": dict(_PLAIN, tcp_segment_size="4m", rndv_scheme="put_zcopy"),
    "tcp-frag4m": dict(_PLAIN, tcp_segment_size="1m",
                       ucx_options=(("RNDV_FRAG_SIZE", "host:4m"),)),
    "tcp-buf4m": dict(_PLAIN, tcp_segment_size="1m",
                      ucx_options=(("TCP_SNDBUF", "4m"), ("TCP_RCVBUF", "4m"))),
    "default": {},  # LinkConfig(): tcp, 1 MiB segments, put_zcopy, eager below 256 KiB
    "sm-fifo64": dict(_SM, shm_fifo_entries=None),
    "sm": _SM,  # FIFO 4096
}
SHIPPED = "default"
DEFAULT_CONFIGS = ("ucxx-default", "tcp-rndv-inf", "tcp-seg256k", "tcp-seg1m", "default", "sm")


def _socket_server(server: socket.socket, buffers: dict[int, memoryview]) -> None:
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            head = conn.recv(8, socket.MSG_WAITALL)
            if len(head) < 8:
                return
            (size,) = struct.unpack("<Q", head)
            view, got = buffers[size], 0
            while got < size:
                n = conn.recv_into(view[got:], size - got)
                if n == 0:
                    return
                got += n
            conn.sendall(b"k")


def receiver(configs: dict[str, dict], sizes: list[int], pipe: Connection) -> None:
    import torch

    from kv_transfer.ucx_link import LinkConfig, LinkListener

    by_nbytes = {s: torch.empty(s // 4) for s in sizes}  # float32 landing buffers
    listeners = {name: LinkListener(lambda h: by_nbytes[h.payload_nbytes], lambda h, b: None,
                                    config=LinkConfig(**kwargs))
                 for name, kwargs in configs.items()}
    server = socket.create_server(("127.0.0.1", 0))
    views = {n: memoryview(b.numpy()).cast("B") for n, b in by_nbytes.items()}
    threading.Thread(target=_socket_server, args=(server, views), daemon=True).start()
    pipe.send(({name: lst.address for name, lst in listeners.items()}, server.getsockname()))
    pipe.recv()  # the sender has finished
    for listener in listeners.values():
        listener.close()


def sender(configs: dict[str, dict], sizes: list[int], reps: int, addresses: tuple,
           out: Connection) -> None:
    import torch

    from kv_transfer.ucx_link import LinkConfig, LinkSender
    from kv_transfer.wire import WireHeader, new_fencing_token

    ucx_addresses, sock_address = addresses
    links = {name: LinkSender(LinkConfig(**kwargs)) for name, kwargs in configs.items()}
    sock = socket.create_connection(tuple(sock_address))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    token = new_fencing_token()
    results: dict[str, dict[int, dict]] = {name: {} for name in [*configs, "socket"]}
    for size in sizes:
        kv = torch.randn(2, size // BYTES_PER_TOKEN, KV_HEADS, HEAD_DIM)
        header = WireHeader.for_layer("bench", token, "bench-model", 0, 0, kv)
        raw = memoryview(kv.numpy()).cast("B")

        def over_ucx(name: str) -> float:
            t = time.perf_counter()
            links[name].send(tuple(ucx_addresses[name]), header, kv)
            return time.perf_counter() - t

        def over_socket() -> float:
            t = time.perf_counter()
            sock.sendall(struct.pack("<Q", raw.nbytes))
            sock.sendall(raw)
            if sock.recv(1) != b"k":
                raise RuntimeError("socket receiver went away")
            return time.perf_counter() - t

        # Warm-up: connection set-up, and first touch of every page of the
        # buffers and of UCX's shared-memory FIFOs (tens of MiB).
        for _ in range(max(2, WARMUP_BYTES // size)):
            over_socket()
            for name in configs:
                over_ucx(name)
        times: dict[str, list[float]] = {name: [] for name in results}
        # Round-robin so every transport sees the same machine noise.
        for _ in range(max(3, reps * 64 * MiB // max(size, 16 * MiB))):
            times["socket"].append(over_socket())
            for name in configs:
                times[name].append(over_ucx(name))
        for name, ts in times.items():
            results[name][size] = {"gbs": size / statistics.median(ts) / 1e9,
                                   "best_gbs": size / min(ts) / 1e9, "reps": len(ts)}
    sock.close()
    for link in links.values():
        link.close()
    out.send(results)


def run(configs: dict[str, dict], sizes: list[int], reps: int, timeout_s: float) -> dict:
    ctx = mp.get_context("spawn")  # UCX must never be initialised before a fork
    recv_end, recv_child = ctx.Pipe()
    rx = ctx.Process(target=receiver, args=(configs, sizes, recv_child), daemon=True)
    rx.start()
    try:
        if not recv_end.poll(timeout_s):
            raise TimeoutError("receiver did not start")
        addresses = recv_end.recv()
        out_end, out_child = ctx.Pipe()
        tx = ctx.Process(target=sender, args=(configs, sizes, reps, addresses, out_child),
                         daemon=True)
        tx.start()
        try:
            if not out_end.poll(timeout_s):
                raise TimeoutError(f"sender did not finish in {timeout_s} s")
            return out_end.recv()
        finally:
            tx.join(10)
            if tx.is_alive():
                tx.kill()
    finally:
        recv_end.send("done")
        rx.join(10)
        if rx.is_alive():
            rx.kill()


def _mib(size: int) -> str:
    return f"{size / MiB:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--sizes-mib", default=",".join(map(str, SIZES_MIB)))
    parser.add_argument("--reps", type=int, default=5,
                        help="repetitions at 64 MiB (more for smaller sizes)")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = parser.parse_args()
    sizes = [int(float(s) * MiB) // BYTES_PER_TOKEN * BYTES_PER_TOKEN
             for s in args.sizes_mib.split(",")]
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")

    results = run({n: CONFIGS[n] for n in names}, sizes, args.reps, args.timeout_s)
    socket_gbs = results["socket"]
    report: dict = {"sizes_mib": [_mib(s) for s in sizes], "socket": {}, "configs": {},
                    "env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")}}
    print(f"{'transport':<18}{'size':>9}{'GB/s':>8}{'(best)':>8}{'socket':>8}{'ratio':>7}")
    for name in [*names, "socket"]:
        rows = {}
        for size, r in results[name].items():
            ratio = r["gbs"] / socket_gbs[size]["gbs"]
            rows[f"{_mib(size)}MiB"] = {**r, "ratio_vs_socket": ratio}
            print(f"{name:<18}{_mib(size):>6}MiB{r['gbs']:>8.2f}{r['best_gbs']:>8.2f}"
                  f"{socket_gbs[size]['gbs']:>8.2f}{ratio:>7.2f}")
        (report["socket"] if name == "socket" else report["configs"].setdefault(name, {})) \
            .update(rows)
    if 64 * MiB in sizes:
        at_64 = {n: report["configs"][n]["64MiB"]["ratio_vs_socket"] for n in names}
        report["best_config"] = max(at_64, key=at_64.__getitem__)
        print(f"best at 64 MiB: {report['best_config']}, "
              f"{at_64[report['best_config']]:.2f}x the socket")
        if SHIPPED in at_64:  # what LinkConfig() does
            report["ratio_vs_socket"] = at_64[SHIPPED]
            report["ucx_gbs"] = report["configs"][SHIPPED]["64MiB"]["gbs"]
            report["socket_gbs"] = report["socket"]["64MiB"]["gbs"]
            print(f"shipped default ({SHIPPED}) at 64 MiB: {at_64[SHIPPED]:.2f}x the socket")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
