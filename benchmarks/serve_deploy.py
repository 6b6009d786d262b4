"""`pdserve bench serve --spawn`: deploys each layout on a private Ray instance, one after
the other, and tears down exactly what it started (by handle, never `ray stop`)."""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.local import LOCAL_NODE_IP, RAY_ENV as SERVICE_RAY_ENV
from cluster.spec import ClusterSpec, load_spec

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"
# the same 2 cores either way: 1 prefill + 1 decode worker, or 2 colocated workers
LAYOUT_SPECS = {"disaggregated": DEPLOY_DIR / "local.yaml",
                "colocated": DEPLOY_DIR / "colocated.yaml"}
RAY_ENV = dict(SERVICE_RAY_ENV, UCX_NET_DEVICES="lo")


def layout_spec(layout: str, path: str | os.PathLike | None = None) -> ClusterSpec:
    """The layout's spec on free loopback ports (so it never collides with a running service)."""
    spec = load_spec(path or LAYOUT_SPECS[layout])
    data = spec.to_dict()
    data["router"].update(host="127.0.0.1", port=0)
    data["metrics"].update(host="127.0.0.1", port=0)
    spec = ClusterSpec.from_dict(data)
    expected = "disaggregated" if layout == "disaggregated" else "colocated"
    if spec.mode != expected:
        raise ValueError(f"{layout} layout: its spec has mode {spec.mode!r}, expected {expected!r}")
    return spec


@contextlib.contextmanager
def private_ray(num_cpus: float, temp_dir: str | None = None) -> Iterator[object]:
    """A private local Ray for this process; reuses the one already initialised (tests)."""
    import ray
    if ray.is_initialized():
        yield ray
        return
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             namespace="pdserve", object_store_memory=128 * 1024 * 1024,
             _node_ip_address=LOCAL_NODE_IP, _temp_dir=temp_dir,
             runtime_env={"env_vars": dict(RAY_ENV)})
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def deployed(spec: ClusterSpec, ready_timeout_s: float = 900.0) -> Iterator[dict]:
    """Starts the service of `spec` on the connected Ray; yields its status (address, pools).
    The controller gets a name of its own, so a service already on that Ray is left alone."""
    import ray

    from cluster.controller import controller_actor
    name = f"pdserve-bench-{os.getpid()}-{time.time_ns()}"
    ctl = controller_actor(spec.router.num_cpus, detached=False, max_restarts=0,
                           name=name).remote(spec.to_dict())
    try:
        yield ray.get(ctl.start.remote(), timeout=ready_timeout_s)
    finally:
        try:
            ray.get(ctl.shutdown.remote(), timeout=120)
        except Exception:  # noqa: BLE001 - killed below either way
            pass
        ray.kill(ctl)
