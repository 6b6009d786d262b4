"""The service controller: one Ray actor that hosts the router's gRPC server, owns the
worker pools, refreshes their health, replaces dead workers, scales, and exports metrics.

Workers are owned by this actor, so they die with it; when the controller restarts
(max_restarts) it deploys the pools again from the spec.
"""
from __future__ import annotations

import asyncio
import os
import logging
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
        self.port = None
        self.metrics_port = None
        self.started_at = time.time()
        self._background_task = None
        self._stopping = False
        context = ray.get_runtime_context()
        if context.was_current_actor_reconstructed:
            # Restarted after a crash: its workers died with it. Serve again on the same
            # address; the call is queued behind this constructor.
            log.warning("controller restarted: deploying the pools again")
            context.current_actor.start.remote()

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
        self.server, self.port, _ = await start_server(servicer, r.host, r.port,
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

    async def shutdown(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        if self._background_task:
            self._background_task.cancel()
        if self.server is not None:
            await self.server.stop(grace_s)
        await asyncio.gather(*(pool.stop_all() for pool in self.pools.values()))
        self.metrics.close()

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
