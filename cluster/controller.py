"""The service controller: one Ray actor that hosts the router's gRPC server, owns the
worker pools, refreshes their health, replaces dead workers, scales, and exports metrics.

Workers are owned by this actor, so they die with it; when the controller restarts
(max_restarts) it deploys the pools again from the spec.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import ray

from cluster.metrics import ServiceMetrics
from cluster.pools import Pool
from cluster.spec import ClusterSpec
from engine.loader import load_model_config, load_tokenizer, resolve_model_dir
from router.colocated import ColocatedRouter
from router.server import GenerationServicer, start_server
from router.service import Router

log = logging.getLogger(__name__)

CONTROLLER_NAME = "pdserve-controller"
NAMESPACE = "pdserve"
REFRESH_INTERVAL_S = 0.5


class ServiceController:
    def __init__(self, spec: dict, worker_host: str | None = None):
        # worker_host None: each worker listens for KV on its Ray node's IP (loopback locally)
        logging.basicConfig(level=logging.INFO)
        self.spec = ClusterSpec.from_dict(spec)
        model_dir = resolve_model_dir(self.spec.model)
        self.model_config = load_model_config(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_model_len = min(self.spec.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.pools = {name: Pool(name, self.spec, worker_host) for name in self.spec.pools}
        self.metrics = ServiceMetrics.for_spec(self.spec)
        r = self.spec.router
        router_cls = ColocatedRouter if self.spec.mode == "colocated" else Router
        self.router = router_cls(self.pools, max_pending=r.max_pending_requests,
                                 request_timeout_s=r.request_timeout_s)
        self.server = None
        self.health = None
        self.port = None
        self.metrics_port = None
        self.started_at = time.time()
        self._background_task = None
        self._stopping = False
        context = ray.get_runtime_context()
        if context.was_current_actor_reconstructed:
            # Restarted after a crash: its workers died with it. Serve again on the same
            # address. Not from here: getting this actor's own handle can wait for the
            # actor to be ALIVE, i.e. for this constructor to return.
            log.warning("controller restarted: deploying the pools again")
            threading.Thread(target=lambda: context.current_actor.start.remote(), daemon=True,
                             name="redeploy").start()

    async def start(self) -> dict:
        """Deploys the pools, then opens the gRPC and metrics endpoints; returns status()."""
        if self.server is not None:
            return await self.status()
        await asyncio.gather(*(pool.scale_to(pool.target) for pool in self.pools.values()))
        r = self.spec.router
        servicer = GenerationServicer(self.router, self.tokenizer, max_model_len=self.max_model_len,
                                      vocab_size=self.model_config.vocab_size, metrics=self.metrics)
        tls = None
        if r.tls:
            tls = (Path(r.tls.key_file).read_bytes(), Path(r.tls.cert_file).read_bytes())
        self.server, self.port, self.health = await start_server(servicer, r.host, r.port,
                                                       api_keys=list(r.api_keys), tls=tls)
        self.metrics_port = self.metrics.serve(self.spec.metrics.host, self.spec.metrics.port)
        self._background_task = asyncio.ensure_future(self._background())
        return await self.status()

    async def _background(self) -> None:
        while not self._stopping:
            try:
                for pool in self.pools.values():
                    await pool.refresh()
                    await pool.replace_dead()
                self.metrics.update_pools([s for pool in self.pools.values()
                                           for s in pool.snapshot() if s.get("alive")])
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad refresh
                log.exception("background refresh failed")
            await asyncio.sleep(REFRESH_INTERVAL_S)

    async def status(self) -> dict:
        return dict(
            address=f"{self.spec.router.host}:{self.port}",
            metrics=f"http://{self.spec.metrics.host}:{self.metrics_port}/metrics",
            mode=self.spec.mode, model=self.spec.model, uptime_s=time.time() - self.started_at,
            router=dict(active=len(self.router.active), **self.router.counts),
            pools={name: dict(target=pool.target, replicas=len(pool.routable),
                              replaced=pool.replaced, workers=pool.snapshot())
                   for name, pool in self.pools.items()})

    async def scale(self, replicas: dict[str, int]) -> dict:
        """Changes pool sizes live; workers that go away are drained first."""
        for name in replicas:
            if name not in self.pools:
                raise ValueError(f"{name}: no such pool in {self.spec.mode} mode "
                                 f"(pools: {', '.join(self.pools)})")
        await asyncio.gather(*(self.pools[name].scale_to(n) for name, n in replicas.items()))
        return await self.status()

    async def shutdown(self, drain_timeout_s: float | None = None) -> dict:
        """Graceful stop: health turns NOT_SERVING and new requests get UNAVAILABLE while
        the streams in flight finish (up to router.drain_timeout_s); then the server and
        the pools stop. Returns how many streams were drained and how many were cut."""
        if self.router.draining:  # a second call (e.g. `down` after a signal)
            return dict(drained=0, cut=0)
        timeout = self.spec.router.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        in_flight = len(self.router.active)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        left = await self.router.drain(timeout)  # pools keep being watched meanwhile
        if left:
            log.warning("shutdown: %d stream(s) still running after %.0f s; cutting them",
                        left, timeout)
        drained_at = time.monotonic()
        blocks_in_use = await self._blocks_in_use(settle_s=0 if left else 5.0)
        self._stopping = True
        if self._background_task:
            self._background_task.cancel()
        if self.server is not None:
            await self.server.stop(1.0)
        await asyncio.gather(*(pool.stop_all() for pool in self.pools.values()))
        self.metrics.close()
        return dict(drained=in_flight - left, cut=left, blocks_in_use=blocks_in_use,
                    reclaim_s=self._reclaimed_at - drained_at)

    async def _blocks_in_use(self, settle_s: float) -> int:
        """KV blocks (and pending transfers) still held on the workers, polled for up to
        `settle_s` until 0: what a drained shutdown would leave behind."""
        deadline = time.monotonic() + settle_s
        while True:
            used = 0
            for pool in self.pools.values():
                await pool.refresh()
                used += sum(s.get("kv_blocks_used", 0) + s.get("pending_transfers", 0)
                            for s in pool.snapshot() if s.get("alive"))
            self._reclaimed_at = time.monotonic()
            if not used or self._reclaimed_at > deadline:
                return used
            await asyncio.sleep(0.05)

    async def ping(self) -> dict:
        return dict(serving=self.server is not None, pid=os.getpid())


def controller_actor(num_cpus: float, detached: bool = True, max_restarts: int = -1,
                     name: str = CONTROLLER_NAME, scheduling_strategy=None):
    options = dict(name=name, namespace=NAMESPACE, num_cpus=num_cpus,
                   max_restarts=max_restarts, max_concurrency=10_000)
    if detached:
        options["lifetime"] = "detached"
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return ray.remote(ServiceController).options(**options)


def get_controller():
    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
