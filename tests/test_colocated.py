"""Colocated mode: the worker picker (pure), the worker core in-process, and the whole
service over real Ray + gRPC answering like one in-process engine."""
from __future__ import annotations

import asyncio
import os
import queue
import signal
import time

import grpc
import pytest

from cluster.client import sampling_message, stream_generate
from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from router.colocated import choose_worker
from router.policy import DecodeView, NoPair, NoPairReason

SPEC = {"mode": "colocated", "router": {"port": 0, "num_cpus": 0}, "metrics": {"port": 0},
        "colocated": {"replicas": 2, "num_cpus": 0.5, "kv_blocks": 256,
                      "max_num_batched_tokens": 256}}
PROMPTS = ["Hi", "The capital of Italy is", "Write one sentence about the ocean. " * 20,
           "1, 2, 3, 4, 5, 6, 7, 8,"]


# -- choose_worker ---------------------------------------------------------------------

def view(wid, free=100, total=100, running=0, waiting=0, alive=True, draining=False,
         max_num_seqs=8, block_size=16):
    return DecodeView(wid, alive, draining, free, total, running, waiting, max_num_seqs, block_size)


def test_picks_most_free_blocks_then_least_load():
    assert choose_worker([view("a", free=40), view("b", free=90)], 16) == "b"
    assert choose_worker([view("a", running=4), view("b", running=1)], 16) == "b"
    # headroom and load trade off: 0.5 - 0/8 beats 0.9 - 4/8
    assert choose_worker([view("a", free=90, running=4), view("b", free=50)], 1) == "b"
    assert choose_worker([view("b"), view("a")], 16) == "a"  # tie: lowest id


def test_skips_dead_draining_and_full_workers():
    assert choose_worker([view("a", alive=False), view("b", free=5)], 16) == "b"
    assert choose_worker([view("a", draining=True, free=100), view("b", free=5)], 16) == "b"
    assert choose_worker([view("a", free=1), view("b", free=3)], 40) == "b"  # 40 tokens: 3 blocks


def test_no_worker_reasons():
    none = choose_worker([view("a", alive=False), view("b", draining=True)], 16)
    assert isinstance(none, NoPair) and none.reason is NoPairReason.NO_DECODE
    assert "2 known" in none.detail
    full = choose_worker([view("a", free=1)], 40)
    assert isinstance(full, NoPair) and full.reason is NoPairReason.DECODE_FULL
    # 100 blocks x 16 = 1600 tokens; the prompt plus one generated token must fit
    big = choose_worker([view("a", total=100, free=100)], 1600)
    assert isinstance(big, NoPair) and big.reason is NoPairReason.TOO_LARGE
    assert choose_worker([view("a", total=100, free=100)], 1599) == "a"
    with pytest.raises(ValueError):
        choose_worker([view("a")], 0)


# -- the worker core, in-process --------------------------------------------------------

@pytest.fixture(scope="module")
def reference(make_engine):
    """One in-process engine: the answers everything else must reproduce."""
    return make_engine()


@pytest.fixture(scope="module")
def core(make_engine):
    from cluster.colocated import ColocatedCore
    c = ColocatedCore(None, engine=make_engine(num_blocks=128, max_num_batched_tokens=64))
    yield c
    c.close()


def _collect(outputs: queue.Queue, timeout=120):
    tokens = []
    while True:
        out = outputs.get(timeout=timeout)
        tokens += out.new_token_ids
        if out.finished:
            return tokens, out


def test_core_equals_one_engine_and_frees_blocks(core, reference):
    engine = reference
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    want = [c.token_ids for c in engine.generate(ids, params)]
    queues = [queue.Queue() for _ in ids]
    for i, (prompt, q) in enumerate(zip(ids, queues)):  # concurrently: one mixed batch
        core.start(f"r{i}", prompt, params, q.put)
    got = [_collect(q) for q in queues]
    assert [tokens for tokens, _ in got] == want
    assert all(last.finish_reason.value == "length" for _, last in got)
    stats = core.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0
    assert stats.generated_tokens >= 8 * len(ids)


def test_core_cancel_and_deadline_free_blocks(core):
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    q1, q2 = queue.Queue(), queue.Queue()
    core.start("long", list(range(100, 400)), params, q1.put)
    core.start("expiring", list(range(500, 600)), params, q2.put, timeout_s=0.5)
    q1.get(timeout=60)  # it runs
    assert core.cancel("long") and not core.cancel("long")
    assert _collect(q1)[1].finish_reason.value == "abort"
    assert _collect(q2)[1].finish_reason.value == "abort"
    deadline = time.monotonic() + 10
    while core.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core.stats().kv_blocks_used == 0 and core.stats().expired == 1


# -- the service over Ray + gRPC -------------------------------------------------------

@pytest.fixture(scope="module")
def service(deploy_service):
    ctl, status = deploy_service(SPEC)
    yield ctl, status
    deploy_service.stop(ctl)  # now: its two workers' memory is not needed by later modules


def _greedy(prompt, max_tokens=10):
    return pb.GenerateRequest(prompt=prompt, sampling=sampling_message(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def _generate_many(address, requests, timeout_s=300):
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        return await asyncio.gather(*(stream_generate(stub, r, timeout_s) for r in requests))


def _used_blocks(ray, ctl) -> int:
    status = ray.get(ctl.status.remote(), timeout=60)
    return sum(w.get("kv_blocks_used", 0) for w in status["pools"]["colocated"]["workers"])


def _wait_blocks_free(ray, ctl, timeout_s=30) -> None:
    deadline = time.monotonic() + timeout_s
    while _used_blocks(ray, ctl) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _used_blocks(ray, ctl) == 0


def test_greedy_over_grpc_equals_one_engine(ray_local, service, reference):
    ctl, status = service
    assert status["mode"] == "colocated" and list(status["pools"]) == ["colocated"]
    workers = status["pools"]["colocated"]["workers"]
    assert len(workers) == 2
    assert all(w["pool"] == "colocated" and w["kv_blocks_total"] == 256 for w in workers)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [c.token_ids for c in reference.generate(PROMPTS, params)]
    results = asyncio.run(_generate_many(status["address"], [_greedy(p) for p in PROMPTS]))
    assert [r.token_ids for r in results] == want
    assert all(r.finish_reason == "length" and r.usage["completion_tokens"] == 10 for r in results)
    _wait_blocks_free(ray_local, ctl)
    status = ray_local.get(ctl.status.remote(), timeout=60)
    assert status["router"]["active"] == 0 and status["router"]["finished"] >= len(PROMPTS)
    # both workers served: the picker spreads concurrent requests
    assert all(w["generated_tokens"] > 0 for w in status["pools"]["colocated"]["workers"])


def test_client_cancel_and_deadline_free_blocks(ray_local, service):
    ctl, status = service

    async def cancel_after_first_token():
        async with grpc.aio.insecure_channel(status["address"]) as ch:
            call = pb_grpc.GenerationStub(ch).Generate(_greedy("Tell me a story.", 2000))
            async for msg in call:
                if msg.token_ids:
                    call.cancel()
                    return True
        return False

    assert asyncio.run(cancel_after_first_token())
    _wait_blocks_free(ray_local, ctl)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_generate_many(status["address"], [_greedy("Count to a thousand:", 2000)],
                                   timeout_s=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_blocks_free(ray_local, ctl)


def test_refuses_what_no_worker_can_hold(service):
    _, status = service
    # 256 blocks x 16 = 4096 tokens of KV; the model's context is 8192
    request = pb.GenerateRequest(prompt_token_ids=[100] * 5000,
                                 sampling=sampling_message(max_tokens=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_generate_many(status["address"], [request]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV cache" in err.value.details()


def test_a_killed_worker_stream_continues_on_the_other(ray_local, service, reference):
    """kill -9 of the worker serving a stream: the router re-runs prompt + tokens already sent
    on the other worker, and the client sees one uninterrupted greedy answer."""
    ctl, status = service
    prompt, max_tokens = "Write a long story about a ship.", 40
    [want] = reference.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                         ignore_eos=True))
    received: list[int] = []
    at_kill: list[int] = []
    failed_before = ray_local.get(ctl.status.remote(), timeout=60)["router"]["failed"]

    def kill_serving_worker():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = ray_local.get(ctl.status.remote(), timeout=60)
            busy = [w for w in st["pools"]["colocated"]["workers"] if w.get("running")]
            if busy:
                os.kill(busy[0]["pid"], signal.SIGKILL)
                at_kill.append(len(received))
                return
            time.sleep(0.1)

    async def generate_and_kill():
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(status["address"]) as ch:
            stub = pb_grpc.GenerationStub(ch)

            def on_message(msg):
                if msg.token_ids and not received:
                    loop.run_in_executor(None, kill_serving_worker)
                received.extend(msg.token_ids)
            return await stream_generate(stub, _greedy(prompt, max_tokens), 300,
                                         on_message=on_message)

    result = asyncio.run(generate_and_kill())
    assert at_kill and at_kill[0] < max_tokens  # killed mid-stream
    assert result.token_ids == want.token_ids and result.finish_reason == "length"
    assert ray_local.get(ctl.status.remote(), timeout=60)["router"]["failed"] == failed_before
