"""Prometheus metrics of the whole service (router + pools), one scrape endpoint.

The router owns one ServiceMetrics. It records each finished request itself
(`observe_request`, `admitted`, `rejected`) and periodically hands in what every worker
reports (`update_pools`): plain dicts of gauges and *cumulative* counters, which are turned
into Prometheus counters by adding per-worker deltas (see metrics_state.CounterDeltas).
Everything lives in a private CollectorRegistry, so several instances (tests, two clusters
in one process) never collide.
"""
from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server

from cluster.metrics_state import CounterDeltas, Window

if TYPE_CHECKING:
    from cluster.spec import ClusterSpec

# CPU serving spans milliseconds (a decode step) to minutes (a long generation under load).
TTFT_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, .75, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TPOT_BUCKETS = (.001, .0025, .005, .01, .02, .03, .05, .075, .1, .15, .2, .3, .5, 1, 2.5, 5)
E2E_BUCKETS = (.05, .1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
TRANSFER_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)

# Prefill reports bytes sent, decode bytes received: both, labelled, so a gap shows losses.
_BYTES_KEYS = {"bytes_sent": "sent", "bytes_received": "received"}


def _label(value: Any) -> str:
    """A finish reason or status code as a label value: a str enum (engine FinishReason) by
    its value, another enum (grpc.StatusCode) by its name, anything else as str()."""
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, str) else value.name
    return str(value)


class ServiceMetrics:
    def __init__(self, pool_prices: Mapping[str, float] | None = None, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        """pool_prices: USD per replica-hour of each pool (the pools to report even when
        empty); window_s: the throughput window of pdserve_cost_per_million_tokens."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()  # update_pools (router loop) vs scrapes (HTTP thread)
        self._prices = dict(pool_prices or {})
        self._replicas: dict[str, int] = {pool: 0 for pool in self._prices}
        self._workers: set[str] = set()  # workers with per-worker gauge series
        self._deltas = CounterDeltas()
        self._tokens = Window(window_s, clock)  # generated tokens, for cost per million
        self._prefix = Window(window_s, clock)  # prefix-cache (hits, queries) per pool
        self._server: Any = None
        self._thread: threading.Thread | None = None
        r = self.registry

        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pdserve_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds", "Request latency, end to end.",
                             buckets=E2E_BUCKETS, registry=r)
        self.requests = Counter("pdserve_requests", "Finished requests.", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Generated tokens.", registry=r)
        self.admitted_requests = Counter("pdserve_requests_admitted", "Requests admitted.", registry=r)
        self.rejected_requests = Counter("pdserve_requests_rejected", "Requests refused, by gRPC code.",
                                         ["code"], registry=r)

        self.queue_depth = Gauge("pdserve_queue_depth", "Requests queued in the pool.", ["pool"],
                                 registry=r)
        self.replicas = Gauge("pdserve_replicas", "Live replicas of the pool.", ["pool"], registry=r)
        self.kv_usage = Gauge("pdserve_kv_cache_usage_ratio", "KV blocks used / total.", ["worker"],
                              registry=r)
        self.kv_blocks_used = Gauge("pdserve_kv_blocks_used", "KV blocks in use.", ["worker"],
                                    registry=r)
        self.prefix_hit_rate = Gauge("pdserve_prefix_cache_hit_rate",
                                     "Prefix-cache hits / queries over the window.", ["pool"],
                                     registry=r)
        self.running = Gauge("pdserve_requests_running", "Requests in the running batch.", ["worker"],
                             registry=r)

        self.transfer_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved, by direction.",
                                      ["direction"], registry=r)
        self.transfer_failures = Counter("pdserve_kv_transfer_failures", "Failed KV transfers.",
                                         ["pool"], registry=r)
        self.leases_expired = Counter("pdserve_leases_expired",
                                      "KV leases that expired before their KV landed.", registry=r)
        self.messages_refused = Counter("pdserve_kv_messages_refused",
                                        "KV messages refused (stale token, bad header, no lease).",
                                        registry=r)
        self.wire_garbage = Counter("pdserve_kv_wire_garbage_frames",
                                    "KV link frames dropped as garbage (bad magic, version or CRC).",
                                    registry=r)
        self.transfer_seconds = Histogram("pdserve_kv_transfer_seconds",
                                          "KV transfer time, lease to ready.",
                                          buckets=TRANSFER_BUCKETS, registry=r)

        self.price_per_hour = Gauge("pdserve_replica_price_per_hour",
                                    "USD per replica-hour of the pool.", ["pool"], registry=r)
        for pool, price in self._prices.items():
            self.price_per_hour.labels(pool).set(price)
            self.replicas.labels(pool).set(0)
            self.queue_depth.labels(pool).set(0)
        self.cost = Gauge("pdserve_cost_per_million_tokens",
                          "USD per million generated tokens at the live replicas' prices and "
                          "the generated-token throughput of the window (NaN with no tokens).",
                          registry=r)
        self.cost.set_function(self.cost_per_million_tokens)  # computed at scrape time

    @classmethod
    def for_spec(cls, spec: ClusterSpec, window_s: float = 60.0) -> ServiceMetrics:
        return cls({name: p.price_per_hour for name, p in spec.pools.items()}, window_s)

    # -- the router's own observations ---------------------------------------------------

    def observe_request(self, ttft_s: float | None, tpot_s: float | None, e2e_s: float,
                        finish_reason: Any, prompt_tokens: int, output_tokens: int) -> None:
        """One finished request. ttft_s is None when no token came out (failed, cancelled
        early); tpot_s is None with fewer than two output tokens."""
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        self.e2e.observe(e2e_s)
        self.requests.labels(_label(finish_reason)).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        with self._lock:
            self._tokens.add(output_tokens)

    def admitted(self) -> None:
        self.admitted_requests.inc()

    def rejected(self, code: Any) -> None:
        """code: a grpc.StatusCode (labelled by name) or a string."""
        self.rejected_requests.labels(_label(code)).inc()

    # -- what the workers report ---------------------------------------------------------

    def update_pools(self, snapshots: Iterable[Mapping[str, Any]]) -> None:
        """One snapshot per live worker, as it reports itself: a plain dict with `pool` and
        `worker_id`; gauges queue_depth, running, kv_blocks_used, kv_blocks_total; cumulative
        counters prefix_cache_hits, prefix_cache_queries, bytes_sent, bytes_received,
        transfers_failed, leases_expired, messages_refused, wire_garbage_frames, transfers_ready;
        transfer_seconds
        (recent durations, newest last); optional incarnation (or pid: changes when it
        restarts). queue_depth falls back to `waiting`; other missing keys count as 0. A worker
        absent from the list, or with alive=False, is gone: its gauges are dropped."""
        snapshots = [s for s in snapshots if s.get("alive", True)]  # a dead actor is gone
        with self._lock:
            depth = {pool: 0.0 for pool in self._prices}
            replicas = {pool: 0 for pool in self._prices}
            for snap in snapshots:
                pool, worker = str(snap["pool"]), str(snap["worker_id"])
                # Decode workers call their queue `waiting` (requests whose KV has landed).
                queued = snap.get("queue_depth", snap.get("waiting", 0))
                depth[pool] = depth.get(pool, 0.0) + float(queued)
                replicas[pool] = replicas.get(pool, 0) + 1
                self._update_worker(pool, worker, snap)
            for gone in set(self._workers) - {str(s["worker_id"]) for s in snapshots}:
                self._drop_worker(gone)
            for pool in depth:
                self.queue_depth.labels(pool).set(depth[pool])
                self.replicas.labels(pool).set(replicas[pool])
                queries = self._prefix.total((pool, "queries"))
                if queries:
                    self.prefix_hit_rate.labels(pool).set(self._prefix.total((pool, "hits")) / queries)
            self._replicas = replicas

    def _update_worker(self, pool: str, worker: str, snap: Mapping[str, Any]) -> None:
        self._deltas.new_incarnation(worker, snap.get("incarnation", snap.get("pid")))
        self._workers.add(worker)
        used, total = float(snap.get("kv_blocks_used", 0)), float(snap.get("kv_blocks_total", 0))
        self.kv_blocks_used.labels(worker).set(used)
        self.kv_usage.labels(worker).set(used / total if total else 0.0)
        self.running.labels(worker).set(float(snap.get("running", 0)))

        def delta(key: str) -> float:
            return self._deltas.delta(worker, key, float(snap[key])) if key in snap else 0.0

        self._prefix.add(delta("prefix_cache_hits"), (pool, "hits"))
        self._prefix.add(delta("prefix_cache_queries"), (pool, "queries"))
        for key, direction in _BYTES_KEYS.items():
            self.transfer_bytes.labels(direction).inc(delta(key))
        self.transfer_failures.labels(pool).inc(delta("transfers_failed"))
        self.leases_expired.inc(delta("leases_expired"))
        self.messages_refused.inc(delta("messages_refused"))
        self.wire_garbage.inc(delta("wire_garbage_frames"))
        recent = list(snap.get("transfer_seconds", ()))
        # With a cumulative count, only the count's increase is new (the list is a ring of
        # recent durations); without one, the worker hands over only durations since its last report.
        new = int(delta("transfers_ready")) if "transfers_ready" in snap else len(recent)
        for seconds in recent[len(recent) - min(new, len(recent)):]:
            self.transfer_seconds.observe(seconds)

    def _drop_worker(self, worker: str) -> None:
        # Its counters stay counted; its gauges would otherwise report a dead worker forever.
        for gauge in (self.kv_blocks_used, self.kv_usage, self.running):
            try:
                gauge.remove(worker)
            except KeyError:
                pass
        self._workers.discard(worker)
        self._deltas.forget(worker)

    # -- cost, serving -------------------------------------------------------------------

    def cost_per_million_tokens(self) -> float:
        """USD per 1e6 generated tokens: the live replicas' hourly price over the window's
        generated-token throughput. NaN when nothing was generated in the window."""
        with self._lock:
            usd_per_hour = sum(n * self._prices.get(pool, 0.0) for pool, n in self._replicas.items())
            tokens_per_hour = self._tokens.total() / self._tokens.span() * 3600.0
        if tokens_per_hour <= 0:
            return math.nan
        return usd_per_hour / tokens_per_hour * 1e6

    def render(self) -> bytes:
        """The exposition text, as the endpoint serves it."""
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 8000) -> int:
        """Starts the HTTP endpoint (/metrics) in a daemon thread; returns the bound port
        (port 0 picks a free one). Call close() to stop it."""
        if self._server is not None:
            raise RuntimeError("the metrics endpoint is already serving")
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
