"""A pool of identical worker actors: start, watch, replace, drain and scale them.

Workers are Ray actors owned by the controller (they die with it). Each has a
fresh `stats` snapshot, refreshed in the background; a worker whose actor died is
marked dead at once (routing skips it) and replaced to keep the pool at its size.
Scaling down drains: the worker stops taking requests, finishes the ones it has,
then is shut down and killed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from cluster.spec import ClusterSpec, PoolSpec

log = logging.getLogger(__name__)


@dataclass
class Worker:
    worker_id: str
    pool: str
    actor: Any
    info: dict = field(default_factory=dict)  # from ready(): pid, node, address, block size ...
    stats: dict = field(default_factory=dict)  # latest stats() snapshot
    alive: bool = True
    draining: bool = False
    started: float = field(default_factory=time.monotonic)
    inflight: int = 0  # requests the router routed here and has not seen finish

    @property
    def busy(self) -> bool:
        s = self.stats
        return self.inflight > 0 or any(s.get(k, 0) for k in ("queue_depth", "running", "waiting",
                                                               "pending_transfers"))


def actor_class(pool: str):
    if pool == "prefill":
        from prefill_worker.actor import PrefillWorker as cls
    elif pool == "decode":
        from decode_worker.actor import DecodeWorker as cls
    else:
        from cluster.colocated import ColocatedWorker as cls
    return ray.remote(cls)


class Pool:
    _ids = itertools.count()

    def __init__(self, name: str, spec: ClusterSpec, host: str, ready_timeout_s: float = 300.0):
        self.name = name
        self.spec = spec
        self.pool_spec: PoolSpec = spec.pool(name)
        self.host = host
        self.ready_timeout_s = ready_timeout_s
        self.target = self.pool_spec.replicas
        self.workers: dict[str, Worker] = {}
        self.replaced = 0
        self._cls = actor_class(name)
        self._scaling = asyncio.Lock()

    # -- membership ------------------------------------------------------------

    @property
    def live(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.alive]

    @property
    def routable(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.alive and not w.draining]

    def _options(self) -> dict:
        p = self.pool_spec
        return dict(num_cpus=p.num_cpus, num_gpus=p.num_gpus, resources=dict(p.resources) or None,
                    max_restarts=0, max_concurrency=1000)

    def _args(self, worker_id: str) -> tuple:
        t = self.spec.transport
        config = self.spec.engine_config(self.name)
        if self.name == "prefill":
            faults = dataclasses.asdict(t.faults) if t.faults else None
            return (worker_id, config, t.kind, t.send_timeout_s, self.pool_spec.threads, self.host,
                    faults)
        if self.name == "decode":
            return (worker_id, config, t.kind, t.lease_ttl_s, self.pool_spec.threads, self.host)
        return (worker_id, config, self.pool_spec.threads)

    async def _start_one(self) -> Worker:
        worker_id = f"{self.name}-{next(self._ids)}"
        actor = self._cls.options(**self._options()).remote(*self._args(worker_id))
        worker = Worker(worker_id, self.name, actor)
        try:
            worker.info = await asyncio.wait_for(actor.ready.remote(), self.ready_timeout_s)
            worker.stats = await actor.stats.remote()
        except asyncio.TimeoutError:
            ray.kill(actor)
            raise RuntimeError(
                f"{self.name} worker {worker_id} did not start within {self.ready_timeout_s:.0f} s; "
                f"the Ray cluster may lack what it asks for ({self._options()}); available: "
                f"{ray.available_resources()}") from None
        except Exception:
            ray.kill(actor)
            raise
        self.workers[worker_id] = worker
        log.info("%s worker %s ready (pid %s)", self.name, worker_id, worker.info.get("pid"))
        return worker

    async def scale_to(self, n: int, drain_timeout_s: float = 600.0) -> None:
        """Start or drain workers until `n` routable ones remain."""
        if n < 0:
            raise ValueError(f"{self.name}: replicas must be >= 0, got {n}")
        async with self._scaling:
            self.target = n
            missing = n - len(self.routable)
            if missing > 0:
                results = await asyncio.gather(*(self._start_one() for _ in range(missing)),
                                               return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    self.target = len(self.routable)  # don't keep retrying what cannot start
                    raise errors[0]
            elif missing < 0:
                # Drain the least loaded (then newest) first: their streams finish sooner.
                order = sorted(self.routable, key=lambda w: (w.busy, -w.started))
                await asyncio.gather(*(self.drain(w, drain_timeout_s) for w in order[:-missing]))

    async def drain(self, worker: Worker, timeout_s: float) -> None:
        worker.draining = True
        try:
            await worker.actor.set_draining.remote(True)
        except Exception:  # noqa: BLE001 - a dead worker has nothing to drain
            pass
        deadline = time.monotonic() + timeout_s
        while worker.alive and worker.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            await self.refresh_one(worker)
        await self.stop(worker)

    async def stop(self, worker: Worker) -> None:
        self.workers.pop(worker.worker_id, None)
        if worker.alive:
            try:
                await asyncio.wait_for(worker.actor.shutdown.remote(), 10)
            except Exception:  # noqa: BLE001 - killed below either way
                pass
        worker.alive = False
        ray.kill(worker.actor)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(w) for w in list(self.workers.values())))

    # -- health ------------------------------------------------------------------

    async def refresh_one(self, worker: Worker, timeout_s: float = 5.0) -> None:
        try:
            worker.stats = await asyncio.wait_for(worker.actor.stats.remote(), timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self.mark_dead(worker)
        except asyncio.TimeoutError:
            pass  # busy, not dead: Ray reports a dead actor as an error, not a hang

    async def refresh(self) -> None:
        await asyncio.gather(*(self.refresh_one(w) for w in self.live))

    def mark_dead(self, worker: Worker) -> None:
        if worker.alive:
            log.warning("%s worker %s died", self.name, worker.worker_id)
        worker.alive = False

    async def replace_dead(self) -> int:
        """Drops dead workers and starts new ones until the pool is back at its target."""
        dead = [w for w in self.workers.values() if not w.alive]
        for w in dead:
            self.workers.pop(w.worker_id, None)
            ray.kill(w.actor)
        missing = self.target - len(self.routable)
        if missing <= 0 or self._scaling.locked():
            return 0
        async with self._scaling:
            started = await asyncio.gather(*(self._start_one() for _ in range(missing)),
                                           return_exceptions=True)
        ok = sum(isinstance(s, Worker) for s in started)
        self.replaced += ok
        return ok

    def snapshot(self) -> list[dict]:
        return [dict(w.stats, worker_id=w.worker_id, pool=self.name, alive=w.alive,
                     draining=w.draining, pid=w.info.get("pid"), node_id=w.info.get("node_id"),
                     inflight=w.inflight)
                for w in self.workers.values()]
