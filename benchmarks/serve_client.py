"""The load generator of `pdserve bench serve`: sends each request at its offset over one
gRPC channel and records what the client saw (never blocks on a slow request)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from benchmarks.serve_metrics import RequestRecord
from benchmarks.serve_workload import BenchRequest
from cluster.client import sampling_message, stream_generate
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc


def grpc_request(req: BenchRequest, run_tag: str) -> pb.GenerateRequest:
    """Greedy, ignore_eos: the answer has exactly output_len tokens whatever the prompt."""
    sampling = sampling_message(max_tokens=req.output_len, temperature=0, ignore_eos=True)
    rid = f"bench-{run_tag}-{req.index}"
    if req.prompt_text:
        return pb.GenerateRequest(request_id=rid, prompt=req.prompt_text, sampling=sampling)
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=list(req.prompt_token_ids),
                              sampling=sampling)


async def _one(stub, req: BenchRequest, run_tag: str, t0: float, timeout_s: float,
               limit: asyncio.Semaphore | None, metadata) -> RequestRecord:
    await asyncio.sleep(max(0.0, t0 + req.send_at - time.perf_counter()))
    record = RequestRecord(req.index, req.send_at, req.prompt_len)
    if limit is not None:
        await limit.acquire()
    try:
        result = await stream_generate(stub, grpc_request(req, run_tag), timeout_s, metadata)
        record.ttft_s, record.e2e_s = result.ttft_s, result.e2e_s
        record.token_times = list(result.token_times)
        record.output_tokens = len(result.token_ids)
        record.prompt_tokens = result.usage.get("prompt_tokens") or req.prompt_len
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"
    except Exception as exc:  # noqa: BLE001 - one bad request must not end the run
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        if limit is not None:
            limit.release()
    return record


async def run_load(address: str, requests: Sequence[BenchRequest], *, run_tag: str,
                   timeout_s: float = 600.0, max_concurrency: int | None = None,
                   progress_desc: str | None = None, metadata=None
                   ) -> tuple[list[RequestRecord], float]:
    """Sends every request at t0 + send_at; returns the records (in request order) and the
    run's duration (t0 to the last completion). progress_desc: show a tqdm bar."""
    bar = None
    if progress_desc is not None:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc=progress_desc, unit="req", leave=False)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        t0 = time.perf_counter() + 0.05
        tasks = [asyncio.ensure_future(_one(stub, r, run_tag, t0, timeout_s, limit, metadata))
                 for r in requests]
        if bar is not None:
            for task in tasks:
                task.add_done_callback(lambda _: bar.update(1))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return list(records), duration


async def warm_up(address: str, n: int, prompt_len: int = 32, output_len: int = 4) -> None:
    """A few concurrent short requests, so first-call costs stay out of the measurements."""
    reqs = [BenchRequest(i, 0.0, prompt_len, output_len,
                         prompt_token_ids=tuple(range(1000 + 97 * i, 1000 + 97 * i + prompt_len)))
            for i in range(n)]
    records, _ = await run_load(address, reqs, run_tag=f"warmup-{time.time_ns()}")
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed[0]}")
