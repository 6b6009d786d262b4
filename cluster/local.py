"""Running pdserve on Ray: a local cluster owned by one `pdserve serve` process, or an
existing cluster joined through RAY_ADDRESS.

`pdserve serve` starts a private local Ray instance, deploys the controller, writes a
state file (so `status`, `scale` and `down` find it) and serves until SIGINT/SIGTERM,
then tears down exactly what it started. `pdserve up` runs `serve` in the background
and returns once the service answers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.spec import ClusterSpec

# Ray rewrites 127.0.0.1 to the host's external address; another loopback address it keeps,
# so a local cluster's own traffic stays on loopback.
LOCAL_NODE_IP = "127.0.0.2"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "UCX_WARN_UNUSED_ENV_VARS": "n"}


def state_path() -> Path:
    base = Path(os.environ.get("PDSERVE_STATE_DIR") or Path.home() / ".cache" / "pdserve" / "run")
    return base / "service.json"


def read_state() -> dict | None:
    try:
        return json.loads(state_path().read_text())
    except (OSError, ValueError):
        return None


def _write_state(state: dict) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def connect(address: str | None = None):
    """Attach this process to the running service's Ray cluster."""
    import ray
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        state = read_state()
        if not state or not _process_alive(state.get("pid", -1)):
            raise RuntimeError("no pdserve service is running here (start one with `pdserve up`), "
                               "and RAY_ADDRESS is not set")
        address = state["ray_address"]
    if not ray.is_initialized():
        ray.init(address=address, namespace="pdserve", log_to_driver=False)
    return ray


def deploy(spec: ClusterSpec, detached: bool) -> tuple[object, dict]:
    """Creates the controller on the connected Ray cluster and starts the service."""
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.controller import controller_actor
    # The router listens on router.host, an address of the node running `pdserve up`.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    controller = controller_actor(spec.router.num_cpus, detached=detached,
                                  scheduling_strategy=here).remote(spec.to_dict())
    status = ray.get(controller.start.remote(), timeout=900)
    return controller, status


def serve(spec: ClusterSpec, on_ready=None) -> None:
    """Foreground: a private Ray instance + the service, until SIGINT/SIGTERM."""
    import ray
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if read_state() and _process_alive(read_state().get("pid", -1)):
        raise RuntimeError(f"a pdserve service is already running (pid {read_state()['pid']}); "
                           f"stop it with `pdserve down`")
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Room to scale each pool to twice its size: Ray CPUs only gate placement.
    ctx = ray.init(address="local", num_cpus=max(os.cpu_count() or 2, 2 * spec.required_cpus),
                   include_dashboard=False, log_to_driver=False, namespace="pdserve",
                   object_store_memory=256 * 1024 * 1024, _node_ip_address=LOCAL_NODE_IP,
                   runtime_env={"env_vars": dict(RAY_ENV, UCX_NET_DEVICES="lo")})
    try:
        controller, status = deploy(spec, detached=False)
        _write_state(dict(pid=os.getpid(), ray_address=ctx.address_info["gcs_address"],
                          address=status["address"], metrics=status["metrics"], ready=True))
        if on_ready:
            on_ready(status)
        while not stop["now"]:
            time.sleep(0.2)
        ray.get(controller.shutdown.remote(), timeout=spec.router.drain_timeout_s + 60)
    finally:
        try:
            state_path().unlink()
        except OSError:
            pass
        ray.shutdown()


def up_background(spec_path: str | None, timeout_s: float = 900.0) -> dict:
    """Starts `pdserve serve` detached from this terminal; returns its state once ready."""
    state = read_state()
    if state and _process_alive(state.get("pid", -1)):
        return state
    log_path = state_path().with_name("service.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "cluster.cli", "serve"] + ([spec_path] if spec_path else [])
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = read_state()
        if state and state.get("pid") == proc.pid and state.get("ready"):
            return state
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"pdserve serve exited with {proc.returncode}; log {log_path}:\n{tail}")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the service did not come up within {timeout_s:.0f} s; see {log_path}")


def down(timeout_s: float = 120.0) -> bool:
    """Stops the service this machine's `pdserve up` started (by its pid)."""
    state = read_state()
    if not state or not _process_alive(state.get("pid", -1)):
        return False
    pid = state["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _process_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True
