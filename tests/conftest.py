"""Shared fixtures: the default model converted once per session, a small engine factory, the
C++ kernels built once, thread counts."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


@pytest.fixture(scope="module")
def kernel():
    """The C++ CPU kernels (engine/kernels), built once; skips the module without a compiler."""
    import shutil

    from engine.kernels import cpu_ops

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (c++ / $CXX) to build the kernels")
    # built even under PDSERVE_ATTENTION=sdpa (which only keeps the engine off them)
    forced = os.environ.pop("PDSERVE_ATTENTION", None)
    try:
        assert cpu_ops.available(), f"kernels failed to build: {cpu_ops._state['error']}"
    finally:
        if forced is not None:
            os.environ["PDSERVE_ATTENTION"] = forced


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Runs the test at 1 and at 2 torch intra-op threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir():
    from engine.loader import resolve_model_dir
    return resolve_model_dir("default")


@pytest.fixture(scope="session")
def make_engine(model_dir):
    """Builds an engine on the default model with the given cache/scheduler settings."""
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.engine import Engine

    def build(block_size=16, num_blocks=256, prefix_caching=True, max_num_seqs=64,
              max_num_batched_tokens=2048, chunked=True, **kwargs) -> Engine:
        return Engine(EngineConfig(
            model=str(model_dir), dtype="float32", device="cpu",
            cache=CacheConfig(block_size, num_blocks, prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, chunked), **kwargs))
    return build


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A private local Ray instance for this test session, torn down by handle."""
    import ray
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 1024 * 1024, _node_ip_address="127.0.0.2",  # Ray rewrites .1
             _temp_dir=str(tmp_path_factory.mktemp("ray")),
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "UCX_NET_DEVICES": "lo",
                                       "UCX_WARN_UNUSED_ENV_VARS": "n"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def deploy_service(ray_local):
    """Deploys a pdserve controller (router + pools) on the test's Ray; torn down by handle."""
    import itertools
    started = []
    names = itertools.count()

    def deploy(spec: dict):
        from cluster.controller import controller_actor
        name = f"test-controller-{next(names)}"
        controller = controller_actor(0, detached=False, name=name).remote(spec)
        status = ray_local.get(controller.start.remote(), timeout=600)
        started.append(controller)
        return controller, status

    def stop(controller) -> None:
        try:
            ray_local.get(controller.shutdown.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - already gone
            pass
        ray_local.kill(controller)

    deploy.stop = stop
    yield deploy
    for controller in started:
        stop(controller)


def pytest_terminal_summary(terminalreporter):
    """Prints the chaos suite's table (scenario, requests, lost, leaked, reclaim time)."""
    from tests import chaos_report
    if not chaos_report.ROWS:
        return
    table = chaos_report.render()
    terminalreporter.write_sep("=", "chaos report")
    terminalreporter.write_line(table)
    if path := os.environ.get("PDSERVE_CHAOS_REPORT"):
        with open(path, "w") as f:
            f.write(table + "\n")
