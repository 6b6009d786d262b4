"""The whole service over real Ray, UCX and gRPC on the default model: router + prefill pool
+ decode pool answer like one colocated engine, stream concurrently, free blocks on cancel,
scale under load, refuse bad input, and export metrics."""
from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cluster.client import sampling_message, stream_generate
from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc

SPEC = {"router": {"port": 0, "num_cpus": 0}, "metrics": {"port": 0},
        "prefill": {"num_cpus": 0.5, "kv_blocks": 256, "max_num_batched_tokens": 512},
        "decode": {"num_cpus": 0.5, "kv_blocks": 256}}
PROMPTS = ["Hi", "The capital of Italy is", "Write one sentence about the ocean. " * 6,
           "def add(a, b):\n    return", "1, 2, 3, 4, 5, 6, 7, 8,", "Translate 'cat' to French:"]


@pytest.fixture(scope="module")
def service(deploy_service):
    controller, status = deploy_service(SPEC)
    return controller, status


def run(coro):
    return asyncio.run(coro)


async def _generate_many(address, requests, timeout_s=300):
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        return await asyncio.gather(*(stream_generate(stub, r, timeout_s) for r in requests))


def _greedy(prompt, max_tokens=12):
    return pb.GenerateRequest(prompt=prompt, sampling=sampling_message(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))


def _status(ray, controller):
    return ray.get(controller.status.remote(), timeout=60)


def _blocks_used(status):
    return {w["worker_id"]: w.get("kv_blocks_used", 0)
            for pool in status["pools"].values() for w in pool["workers"]}


def _wait_idle(ray, controller, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = _status(ray, controller)
        if not any(_blocks_used(st).values()) and st["router"]["active"] == 0:
            return st
        time.sleep(0.3)
    raise AssertionError(f"blocks still held: {_blocks_used(st)}")


@pytest.fixture(scope="module")
def expected(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


def test_greedy_over_grpc_equals_one_engine(ray_local, service, expected):
    controller, status = service
    results = run(_generate_many(status["address"], [_greedy(p) for p in PROMPTS]))
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" and r.usage["completion_tokens"] == 12 for r in results)
    _wait_idle(ray_local, controller)


def test_health_and_reflection(service):
    _, status = service

    async def check():
        async with grpc.aio.insecure_channel(status["address"]) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            names = []
            async for resp in stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                names += [s.name for s in resp.list_services_response.service]
            assert "pdserve.v1.Generation" in names
    run(check())


@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(prompt="x" * 40000), "prompt"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling_message(max_tokens=0)), "max_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling_message(temperature=-1)), "temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling_message(top_p=0)), "top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling_message(top_p=1.5)), "top_p"),
    (pb.GenerateRequest(prompt_token_ids=[1, 2, 49152]), "prompt_token_ids"),
])
def test_bad_requests_are_invalid_argument(service, request_, field):
    _, status = service
    with pytest.raises(grpc.aio.AioRpcError) as err:
        run(_generate_many(status["address"], [request_]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    [ok] = run(_generate_many(status["address"], [_greedy("still serving?", 2)]))
    assert len(ok.token_ids) == 2


def test_32_concurrent_streams_complete(ray_local, service):
    controller, status = service
    requests = [_greedy(f"Count to {i}:", 6) for i in range(32)]
    results = run(_generate_many(status["address"], requests))
    assert all(len(r.token_ids) == 6 and r.finish_reason == "length" for r in results)
    assert len({r.request_id for r in results}) == 32
    _wait_idle(ray_local, controller)


def test_cancelled_stream_frees_blocks_on_both_pools(ray_local, service):
    controller, status = service

    async def cancel_midway():
        async with grpc.aio.insecure_channel(status["address"]) as ch:
            call = pb_grpc.GenerationStub(ch).Generate(_greedy("Tell me a long story. " * 8, 500))
            got = 0
            async for msg in call:
                got += len(msg.token_ids)
                if got >= 3:
                    break
            held = _blocks_used(_status(ray_local, controller))
            call.cancel()
            return got, held

    got, held = run(cancel_midway())
    assert got >= 3 and any(held.values())  # it held KV while streaming
    st = _wait_idle(ray_local, controller, timeout_s=10)
    assert st["router"]["cancelled"] >= 1


def test_metrics_endpoint_parses_and_moves(ray_local, service):
    _, status = service

    def scrape():
        text = urllib.request.urlopen(status["metrics"], timeout=10).read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:  # labelled samples summed per name
                values[s.name] = values.get(s.name, 0) + s.value
        return values

    before = scrape()
    run(_generate_many(status["address"], [_greedy("metrics please", 4)]))
    time.sleep(1.5)  # the controller refreshes worker stats twice a second
    after = scrape()
    assert after["pdserve_generation_tokens_total"] - before.get("pdserve_generation_tokens_total", 0) == 4
    assert after["pdserve_time_to_first_token_seconds_count"] > before.get(
        "pdserve_time_to_first_token_seconds_count", 0)
    assert after["pdserve_kv_transfer_bytes_total"] > before.get("pdserve_kv_transfer_bytes_total", 0)
    assert after["pdserve_requests_total"] == before.get("pdserve_requests_total", 0) + 1
    text = urllib.request.urlopen(status["metrics"], timeout=10).read().decode()
    for name in ("pdserve_e2e_request_latency_seconds", "pdserve_kv_cache_usage_ratio",
                 "pdserve_replicas", "pdserve_kv_transfer_bytes_total", "pdserve_leases_expired_total"):
        assert name in text


def test_scale_up_and_down_under_load_fails_no_stream(ray_local, service, make_engine):
    controller, status = service
    requests = [_greedy(p, 24) for p in PROMPTS * 2]

    async def load_while_scaling():
        streams = asyncio.ensure_future(_generate_many(status["address"], requests))
        await asyncio.sleep(0.5)
        up = await controller.scale.remote({"prefill": 2, "decode": 2})
        results = await streams
        second = await _generate_many(status["address"], requests)  # on 2 + 2 workers
        down_task = asyncio.ensure_future(controller.scale.remote({"prefill": 1, "decode": 1}))
        third = await _generate_many(status["address"], requests)
        down = await down_task
        return up, results + second + third, down

    up, results, down = run(load_while_scaling())
    assert [p["replicas"] for p in up["pools"].values()] == [2, 2]
    assert [p["replicas"] for p in down["pools"].values()] == [1, 1]
    engine = make_engine()
    want = [c.token_ids for c in engine.generate(
        PROMPTS * 2, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))]
    assert [r.token_ids for r in results] == want * 3
    _wait_idle(ray_local, controller)
