"""Service metrics: the exposition parses, counters follow observations and worker deltas, HTTP serves."""
from __future__ import annotations

import math
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import ServiceMetrics
from engine.request import FinishReason

EXPECTED = {  # family name (as the parser reports it) -> type
    "pdserve_time_to_first_token_seconds": "histogram",
    "pdserve_time_per_output_token_seconds": "histogram",
    "pdserve_e2e_request_latency_seconds": "histogram",
    "pdserve_kv_transfer_seconds": "histogram",
    "pdserve_requests": "counter", "pdserve_prompt_tokens": "counter",
    "pdserve_generation_tokens": "counter", "pdserve_requests_admitted": "counter",
    "pdserve_requests_rejected": "counter", "pdserve_kv_transfer_bytes": "counter",
    "pdserve_kv_transfer_failures": "counter", "pdserve_leases_expired": "counter",
    "pdserve_kv_messages_refused": "counter", "pdserve_kv_wire_garbage_frames": "counter",
    "pdserve_queue_depth": "gauge", "pdserve_replicas": "gauge",
    "pdserve_kv_cache_usage_ratio": "gauge", "pdserve_kv_blocks_used": "gauge",
    "pdserve_prefix_cache_hit_rate": "gauge", "pdserve_requests_running": "gauge",
    "pdserve_cost_per_million_tokens": "gauge", "pdserve_replica_price_per_hour": "gauge",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the rendered text, by (name, sorted labels), through the official parser."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def test_every_metric_is_exposed_with_its_type():
    m = ServiceMetrics({"prefill": 0.1, "decode": 0.2})
    m.observe_request(0.1, 0.02, 1.0, "stop", 5, 10)
    m.rejected("RESOURCE_EXHAUSTED")
    m.update_pools([{"pool": "decode", "worker_id": "d0", "prefix_cache_hits": 1,
                     "prefix_cache_queries": 2, "bytes_received": 1}])
    families = {f.name: f.type for f in text_string_to_metric_families(m.render().decode())}
    assert {name: families.get(name) for name in EXPECTED} == EXPECTED
    assert value(m, "pdserve_replica_price_per_hour", pool="decode") == 0.2


def test_request_counters_move_with_observations():
    m = ServiceMetrics()
    m.admitted(), m.admitted(), m.admitted()
    m.observe_request(0.3, 0.05, 2.0, FinishReason.STOP, prompt_tokens=7, output_tokens=40)
    m.observe_request(0.5, None, 0.6, FinishReason.LENGTH, prompt_tokens=3, output_tokens=1)
    m.observe_request(None, None, 0.1, "cancelled", prompt_tokens=4, output_tokens=0)
    m.rejected(grpc.StatusCode.RESOURCE_EXHAUSTED)
    m.rejected(grpc.StatusCode.RESOURCE_EXHAUSTED)
    m.rejected("INVALID_ARGUMENT")
    assert value(m, "pdserve_requests_admitted_total") == 3
    assert value(m, "pdserve_requests_total", finish_reason="stop") == 1
    assert value(m, "pdserve_requests_total", finish_reason="length") == 1
    assert value(m, "pdserve_requests_total", finish_reason="cancelled") == 1
    assert value(m, "pdserve_prompt_tokens_total") == 14
    assert value(m, "pdserve_generation_tokens_total") == 41
    assert value(m, "pdserve_requests_rejected_total", code="RESOURCE_EXHAUSTED") == 2
    assert value(m, "pdserve_requests_rejected_total", code="INVALID_ARGUMENT") == 1
    # A missing TTFT / TPOT (no token, one token) is not observed as zero.
    assert value(m, "pdserve_time_to_first_token_seconds_count") == 2
    assert value(m, "pdserve_time_to_first_token_seconds_sum") == pytest.approx(0.8)
    assert value(m, "pdserve_time_per_output_token_seconds_count") == 1
    assert value(m, "pdserve_e2e_request_latency_seconds_count") == 3
    assert value(m, "pdserve_time_to_first_token_seconds_bucket", le="0.5") == 2
    assert value(m, "pdserve_time_to_first_token_seconds_bucket", le="0.25") == 0


def worker(worker_id="d0", pool="decode", **fields):
    return {"pool": pool, "worker_id": worker_id, **fields}


def test_worker_counters_add_deltas_and_survive_restarts():
    m = ServiceMetrics()
    bytes_received = lambda: value(m, "pdserve_kv_transfer_bytes_total", direction="received")  # noqa: E731
    m.update_pools([worker(bytes_received=100, leases_expired=1), worker("p0", "prefill", bytes_sent=100)])
    assert bytes_received() == 100
    m.update_pools([worker(bytes_received=250, leases_expired=1), worker("p0", "prefill", bytes_sent=100)])
    assert bytes_received() == 250  # cumulative 250: +150, not +250
    assert value(m, "pdserve_leases_expired_total") == 1
    assert value(m, "pdserve_kv_transfer_bytes_total", direction="sent") == 100
    m.update_pools([worker(bytes_received=30)])  # restarted: counting began again at 0
    assert bytes_received() == 280
    m.update_pools([worker(bytes_received=40, incarnation="a")])
    assert bytes_received() == 290
    # A restart noticed by its incarnation even though the new count passed the old one.
    m.update_pools([worker(bytes_received=500, incarnation="b")])
    assert bytes_received() == 790
    m.update_pools([worker(bytes_received=500, incarnation="b", transfers_failed=2, messages_refused=3,
                           wire_garbage_frames=1)])
    assert bytes_received() == 790
    assert value(m, "pdserve_kv_transfer_failures_total", pool="decode") == 2
    assert value(m, "pdserve_kv_messages_refused_total") == 3
    assert value(m, "pdserve_kv_wire_garbage_frames_total") == 1


def test_transfer_seconds_observes_only_new_durations():
    m = ServiceMetrics()
    count = lambda: value(m, "pdserve_kv_transfer_seconds_count")  # noqa: E731
    m.update_pools([worker(transfers_ready=2, transfer_seconds=[0.1, 0.2])])
    m.update_pools([worker(transfers_ready=2, transfer_seconds=[0.1, 0.2])])  # nothing new
    assert count() == 2
    m.update_pools([worker(transfers_ready=3, transfer_seconds=[0.1, 0.2, 0.4])])
    assert count() == 3
    assert value(m, "pdserve_kv_transfer_seconds_sum") == pytest.approx(0.7)
    # A ring that lost old entries: only the ones the count says are new, newest last.
    m.update_pools([worker(transfers_ready=1003, transfer_seconds=[9.0] * 998 + [0.01, 0.02])])
    assert count() == 1003
    # Without a cumulative count, the list is what happened since the last report.
    m.update_pools([worker("p0", "prefill", transfer_seconds=[0.5])])
    m.update_pools([worker("p0", "prefill", transfer_seconds=[0.5])])
    assert count() == 1005


def test_pool_gauges_and_dead_workers_disappear():
    m = ServiceMetrics({"prefill": 0.0, "decode": 0.0})
    assert value(m, "pdserve_replicas", pool="decode") == 0  # known pools show up empty
    m.update_pools([
        worker("p0", "prefill", queue_depth=3, prefix_cache_hits=1, prefix_cache_queries=4),
        worker("p1", "prefill", queue_depth=2, prefix_cache_hits=2, prefix_cache_queries=2),
        worker("d0", kv_blocks_used=25, kv_blocks_total=100, running=4),
        worker("d1", kv_blocks_used=0, kv_blocks_total=100, running=0)])
    assert value(m, "pdserve_replicas", pool="prefill") == 2
    assert value(m, "pdserve_queue_depth", pool="prefill") == 5
    assert value(m, "pdserve_prefix_cache_hit_rate", pool="prefill") == pytest.approx(0.5)
    assert value(m, "pdserve_kv_cache_usage_ratio", worker="d0") == 0.25
    assert value(m, "pdserve_kv_blocks_used", worker="d0") == 25
    assert value(m, "pdserve_requests_running", worker="d0") == 4
    m.update_pools([worker("p0", "prefill"), worker("d0", kv_blocks_used=10, kv_blocks_total=100,
                                                    waiting=6),
                    worker("d1", alive=False)])
    s = samples(m)
    assert s[("pdserve_queue_depth", (("pool", "decode"),))] == 6  # decode's queue is `waiting`
    assert ("pdserve_kv_blocks_used", (("worker", "d1"),)) not in s
    assert s[("pdserve_kv_blocks_used", (("worker", "d0"),))] == 10
    assert s[("pdserve_replicas", (("pool", "prefill"),))] == 1
    assert s[("pdserve_replicas", (("pool", "decode"),))] == 1


def test_cost_per_million_tokens_over_the_window():
    clock = Clock()
    m = ServiceMetrics({"prefill": 1.0, "decode": 0.5}, window_s=60, clock=clock)
    cost = lambda: value(m, "pdserve_cost_per_million_tokens")  # noqa: E731
    assert math.isnan(cost())  # nothing generated yet: undefined, not free
    m.update_pools([worker("p0", "prefill"), worker("p1", "prefill"), worker("d0")])
    clock.now += 100  # the window is full: 60 s
    m.observe_request(0.1, 0.01, 1.0, "stop", 10, 1200)
    m.observe_request(0.1, 0.01, 1.0, "stop", 10, 2400)
    # 3600 tokens / 60 s = 216000 tokens/h; 2 x $1 + 1 x $0.5 = $2.5/h.
    assert cost() == pytest.approx(2.5 / 216000 * 1e6)
    clock.now += 61
    assert math.isnan(cost())  # the tokens left the window


def test_cost_window_is_short_right_after_start():
    clock = Clock()
    m = ServiceMetrics({"decode": 3.6}, window_s=60, clock=clock)
    m.update_pools([worker("d0")])
    clock.now += 10
    m.observe_request(0.1, 0.01, 1.0, "stop", 10, 100)  # 100 tokens in 10 s, not in 60 s
    assert value(m, "pdserve_cost_per_million_tokens") == pytest.approx(3.6 / 36000 * 1e6)


def test_http_endpoint_serves_and_shuts_down():
    m = ServiceMetrics({"decode": 0.1})
    port = m.serve("127.0.0.1", 0)
    try:
        assert port > 0
        m.observe_request(0.1, 0.01, 1.0, "stop", 3, 4)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            body = response.read().decode()
        names = {f.name for f in text_string_to_metric_families(body)}
        assert "pdserve_time_to_first_token_seconds" in names
        assert "pdserve_generation_tokens_total 4.0" in body
        with pytest.raises(RuntimeError, match="already serving"):
            m.serve("127.0.0.1", 0)
    finally:
        m.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_instances_do_not_share_a_registry():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.admitted()
    assert value(a, "pdserve_requests_admitted_total") == 1
    assert value(b, "pdserve_requests_admitted_total") == 0
