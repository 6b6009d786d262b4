"""Deploying with `ray up` (deploy/): the cluster YAMLs and specs agree, and the whole user
path works on this machine.

The slow test does what a user does: an ssh server on loopback (deploy/setup_local_ssh.sh,
throwaway key), `ray up -y deploy/ray-local.yaml` (head 127.0.0.2 with the router and the
prefill pool, worker 127.0.0.3 with the decode pool; its start commands run `pdserve up`),
a gRPC generate call, `pdserve scale --decode 2` and `pdserve status` through `ray exec`,
then `ray down -y`. It tears down only what it started: the cluster (`ray down`) and the
sshd (by its pidfile; the sshd's PID namespace holds every process of the cluster, so
stopping it also ends anything `ray down` left). It skips only where this machine cannot
run the ssh server (no root, no PID namespaces).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RAY_LOCAL = DEPLOY / "ray-local.yaml"
SETUP_SSH = DEPLOY / "setup_local_ssh.sh"
LOCK_PATH = Path("/tmp/pdserve-ray-local.lock")  # one ray-local run per machine at a time
VENV_BIN = Path(sys.executable).parent

CLOUD = {"ray-aws.yaml": "spec-gpu.yaml", "ray-gcp.yaml": "spec-gpu.yaml"}


def _load_yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _start_resources(command: str) -> dict[str, float]:
    """The custom resources a `ray start ... --resources='{...}'` command line gives a node."""
    m = re.search(r"--resources='([^']*)'", command)
    return {k: float(v) for k, v in json.loads(m.group(1)).items()} if m else {}


def _start_flag(command: str, flag: str) -> str | None:
    m = re.search(rf"--{flag}=(\S+)", command)
    return m.group(1) if m else None


# -- fast checks of the files ---------------------------------------------------------------

def test_local_yaml_maps_pools_onto_nodes():
    cfg = _load_yaml("ray-local.yaml")
    spec = load_spec(DEPLOY / "spec-cluster.yaml")
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    worker_cmds = " ".join(cfg["worker_start_ray_commands"])
    head = {"CPU": float(_start_flag(head_cmds, "num-cpus")), **_start_resources(head_cmds)}
    worker = {"CPU": float(_start_flag(worker_cmds, "num-cpus")), **_start_resources(worker_cmds)}

    # The router answers on the head's address; the GCS port is the one the worker joins.
    assert spec.router.host == cfg["provider"]["head_ip"]
    gcs_port = _start_flag(head_cmds, "port")
    assert f"--address=$RAY_HEAD_IP:{gcs_port}" in worker_cmds
    assert "pdserve up" in head_cmds and "spec-cluster.yaml" in head_cmds
    # prefill only fits the head, decode only the worker node, and decode can scale to 2.
    prefill, decode = set(spec.prefill.resources), set(spec.decode.resources)
    assert prefill <= set(head) and not prefill & set(worker)
    assert decode <= set(worker) and not decode & set(head)
    for name, node, replicas in (("prefill", head, spec.prefill.replicas), ("decode", worker, 2)):
        pool = spec.pool(name)
        for res, amount in pool.resources.items():
            assert node[res] >= amount * replicas, (name, res)
        router_cpus = spec.router.num_cpus if node is head else 0
        assert node["CPU"] >= pool.num_cpus * replicas + router_cpus, name
    # Head and worker share one host: a `ray stop` in the start commands would kill the head.
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert not re.search(r"(^|;|&&)\s*ray stop\b", cmd), cmd
    assert cfg["auth"]["ssh_private_key"].endswith("ray-local/id_ed25519")


@pytest.mark.parametrize("cluster_yaml", sorted(CLOUD))
def test_cloud_yaml_valid_and_maps_pools_onto_node_types(cluster_yaml):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load_yaml(cluster_yaml)
    validate_config(prepare_config(yaml.safe_load((DEPLOY / cluster_yaml).read_text())))
    spec = load_spec(DEPLOY / CLOUD[cluster_yaml])
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert not {"GPU", "prefill", "decode"} & set(head["resources"])
    for name, pool in spec.pools.items():
        # Exactly one worker node type offers the pool's resources, with GPUs for it.
        fits = [t for t, nt in types.items()
                if all(nt["resources"].get(r, 0) >= a for r, a in pool.resources.items())
                and nt["resources"].get("GPU", 0) >= pool.num_gpus
                and nt["resources"].get("CPU", 0) >= pool.num_cpus]
        assert fits == [name], (name, fits)
        node = types[name]
        per_node = min(node["resources"]["GPU"] // pool.num_gpus,
                       min(node["resources"][r] // a for r, a in pool.resources.items()))
        assert pool.replicas <= per_node * node["max_workers"], name
    cmds = " ".join(raw["head_start_ray_commands"])
    assert "pdserve up" in cmds and CLOUD[cluster_yaml] in cmds
    assert "wait_for_resources.py" in cmds


def test_wait_for_resources_rejects_bad_arguments():
    out = subprocess.run([sys.executable, str(DEPLOY / "wait_for_resources.py"), "decode"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "NAME=AMOUNT" in out.stderr


# -- the whole user path ---------------------------------------------------------------------

def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


class Runner:
    """Runs commands with a bounded time, keeps their output for the failure message."""

    def __init__(self, env: dict, log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.n = 0

    def __call__(self, args: list[str], timeout: float,
                 check: bool = True) -> subprocess.CompletedProcess:
        self.n += 1
        start = time.monotonic()
        try:
            out = subprocess.run(args, env=self.env, cwd=REPO, capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            text = e.stdout or ""
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            (self.log_dir / f"{self.n:02d}.log").write_text(text)
            raise AssertionError(f"{' '.join(args[:3])}... did not finish within {timeout:.0f} s:\n"
                                 f"{_tail(text)}") from None
        elapsed = time.monotonic() - start
        (self.log_dir / f"{self.n:02d}.log").write_text(
            f"$ {args}\n[{elapsed:.1f} s, rc {out.returncode}]\n{out.stdout}\n{out.stderr}")
        print(f"[{elapsed:5.1f} s] {' '.join(args)[:120]}", flush=True)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited with {out.returncode}:\n"
                                 f"{_tail(out.stdout)}\n{_tail(out.stderr)}")
        return out


def _ray_logs_tail(temp_dir: Path) -> str:
    logs = temp_dir / "session_latest" / "logs"
    parts = []
    for name in ("monitor.log", "monitor.out", "raylet.err"):
        path = logs / name
        if path.is_file():
            parts.append(f"--- {path}\n{_tail(path.read_text(errors='replace'), 25)}")
    return "\n".join(parts)


def _namespace_pids(pid: int) -> list[tuple[int, str]]:
    """Processes in the PID namespace of `pid` (the sshd), with their command lines."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") == ns:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(entry.name), cmd.strip()))
        except OSError:
            continue
    return found


def _cluster_processes(sshd_pid: int) -> list[tuple[int, str]]:
    """What the cluster runs in the sshd's namespace: anything but sshd itself and sessions."""
    return [(pid, cmd) for pid, cmd in _namespace_pids(sshd_pid) if not cmd.startswith("sshd")]


def _json_line(text: str, prefix: str):
    for line in text.splitlines():
        if line.startswith(prefix):
            return json.loads(line)
    raise AssertionError(f"no line starting with {prefix!r} in:\n{_tail(text)}")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


@pytest.fixture
def machine_lock():
    """One ray-local cluster per machine: the addresses and the cluster name are fixed."""
    with open(LOCK_PATH, "a+") as f:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another ray-local run holds {LOCK_PATH} for more than 600 s")
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ray_up_generate_scale_down(machine_lock, tmp_path):
    cfg = _load_yaml("ray-local.yaml")
    spec = load_spec(DEPLOY / "spec-cluster.yaml")
    head_ip, worker_ip = cfg["provider"]["head_ip"], cfg["provider"]["worker_ips"][0]
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    gcs_address = f"{head_ip}:{_start_flag(head_cmds, 'port')}"
    temp_dir = Path(_start_flag(head_cmds, "temp-dir"))
    router = f"{spec.router.host}:{spec.router.port}"
    state_dir = Path.home() / ".cache" / "pdserve" / "ray-local"
    assert cfg["auth"]["ssh_private_key"] == "~/.cache/pdserve/ray-local/id_ed25519"
    cluster_state = Path("/tmp/ray") / f"cluster-{cfg['cluster_name']}.state"

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
               RAY_UP_enable_autoscaler_v2="0",  # v2 never launches local worker_ips (#57153)
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("PDSERVE_RAY_LOCAL_DIR", None)
    run = Runner(env, tmp_path)
    ray = str(VENV_BIN / "ray")
    pdserve = str(VENV_BIN / "pdserve")

    sshd_was_running = subprocess.run(["bash", str(SETUP_SSH), "status"], capture_output=True,
                                      env=env, timeout=30).returncode == 0
    out = run(["bash", str(SETUP_SSH), "up"], timeout=600, check=False)
    if out.returncode == 3:
        pytest.skip(f"this machine cannot run the loopback ssh server: {out.stderr.strip()}")
    assert out.returncode == 0, f"setup_local_ssh.sh up failed:\n{out.stdout}\n{out.stderr}"
    sshd_pid = int((state_dir / "sshd.pid").read_text())

    cluster_up = False
    down_ok = False
    canary = None
    try:
        if not sshd_was_running and cluster_state.exists():
            # Every process of a ray-local cluster lives in the sshd's namespace: with no
            # sshd, a state file that still lists running nodes is stale (a killed run).
            state = json.loads(cluster_state.read_text() or "{}")
            if any(node.get("state") != "terminated" for node in state.values()):
                cluster_state.unlink()
        elif cluster_state.exists():
            state = json.loads(cluster_state.read_text() or "{}")
            live = [ip for ip, node in state.items() if node.get("state") != "terminated"]
            assert not live, (f"a {cfg['cluster_name']} cluster is already up ({live}); "
                              f"`ray down {RAY_LOCAL}` it first")

        # 1. ray up: the head's start commands run `pdserve up`, which returns once the
        #    router answers, i.e. once the decode worker is up on the worker node.
        t0 = time.monotonic()
        cluster_up = True
        try:
            run([ray, "up", "-y", "--no-config-cache", str(RAY_LOCAL)], timeout=600)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_ray_logs_tail(temp_dir)}") from None
        t_up = time.monotonic() - t0
        assert _port_open(spec.router.host, spec.router.port), f"{router} does not answer"

        # 2. a gRPC generate call to the router the cluster started.
        out = run([pdserve, "generate", "--address", router, "--json", "--chat",
                   "--max-tokens", "16", "--temperature", "0", "What is the capital of France?"],
                  timeout=180)
        first = json.loads(out.stdout.strip().splitlines()[-1])
        assert first["token_ids"] and first["text"].strip(), first
        assert first["finish_reason"] in ("stop", "length"), first

        # 3. scale the decode pool through `ray exec` (on the head), then read the status and
        #    the nodes: prefill on the head, both decode workers on the worker node.
        nodes_py = ("import json, ray; ray.init(address='%s', log_to_driver=False); "
                    "print(json.dumps([dict(id=n['NodeID'], ip=n['NodeManagerAddress']) "
                    "for n in ray.nodes() if n['Alive']]))" % gcs_address)
        remote = (f"export RAY_ADDRESS={gcs_address}; pdserve scale --decode 2 && "
                  f"pdserve status --json && python -c \"{nodes_py}\"")
        out = run([ray, "exec", str(RAY_LOCAL), remote], timeout=420)
        status = _json_line(out.stdout, '{"address"')
        node_ip = {n["id"]: n["ip"] for n in _json_line(out.stdout, '[{"id"')}
        assert sorted(node_ip.values()) == sorted([head_ip, worker_ip]), node_ip
        pools = status["pools"]
        assert (pools["prefill"]["replicas"], pools["decode"]["replicas"]) == (1, 2), pools
        assert [node_ip[w["node_id"]] for w in pools["prefill"]["workers"]] == [head_ip]
        assert [node_ip[w["node_id"]] for w in pools["decode"]["workers"]] == [worker_ip] * 2
        assert all(w["alive"] for p in pools.values() for w in p["workers"])
        assert status["address"] == router and status["router"]["finished"] >= 1, status

        # 4. still serving after the scale.
        out = run([pdserve, "generate", "--address", router, "--json", "--max-tokens", "8",
                   "--temperature", "0", "--ignore-eos", "The sky is"], timeout=180)
        second = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(second["token_ids"]) == 8, second

        # 5. ray down: nothing of the cluster is left, and the router is gone. Its bare
        #    `ray stop` must not reach Ray processes outside the cluster: a canary that
        #    `ray stop` would kill (its command line names a Ray worker) stays alive.
        canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)",
                                   "default_worker.py"], stdin=subprocess.DEVNULL)
        t1 = time.monotonic()
        run([ray, "down", "-y", str(RAY_LOCAL)], timeout=300)
        down_ok = True
        assert canary.poll() is None, "ray down's `ray stop` killed a process outside the cluster"
        t_down = time.monotonic() - t1
        deadline = time.monotonic() + 30
        leftovers = _cluster_processes(sshd_pid)
        while (leftovers or _port_open(spec.router.host, spec.router.port)) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            leftovers = _cluster_processes(sshd_pid)
        assert not leftovers, f"processes left after ray down: {leftovers}"
        assert not _port_open(spec.router.host, spec.router.port), f"{router} answers after down"
        print(f"ray up {t_up:.0f} s, ray down {t_down:.0f} s, total "
              f"{time.monotonic() - t0:.0f} s", flush=True)
    finally:
        if canary is not None:
            canary.kill()
            canary.wait(timeout=10)
        if cluster_up and not down_ok:
            # Bounded: with a head that failed its setup, `ray down` can loop while the
            # head's autoscaler lives. Stopping the sshd below ends whatever is left.
            try:
                run([ray, "down", "-y", str(RAY_LOCAL)], timeout=90, check=False)
            except AssertionError:
                pass
        if not sshd_was_running:
            subprocess.run(["bash", str(SETUP_SSH), "down"], env=env, timeout=60)
            if cluster_state.exists() and not down_ok:
                cluster_state.unlink()  # its nodes died with the sshd's namespace
            if down_ok:
                shutil.rmtree(temp_dir, ignore_errors=True)  # this run's Ray session logs
