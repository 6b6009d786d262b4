"""The deployment spec: defaults, one error per kind naming its field, YAML round trip, shipped files."""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import pytest
import yaml

from cluster.spec import DEFAULT_SPEC_PATH, ClusterSpec, SpecError, load_spec

REPO = Path(__file__).resolve().parent.parent
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # default model, fp32: layers x (K,V) x kv heads x dim x 4 B


def get(obj, path: str):
    return functools.reduce(getattr, path.split("."), obj)


DEFAULTS = [
    ("model", "default"), ("dtype", "auto"), ("device", "auto"), ("max_model_len", None),
    ("mode", "disaggregated"),
    ("router.host", "127.0.0.1"), ("router.port", 50051), ("router.max_pending_requests", 256),
    ("router.request_timeout_s", 600.0), ("router.api_keys", ()), ("router.tls", None),
    ("router.num_cpus", 0.5), ("router.exposed", False),
    ("metrics.host", "127.0.0.1"), ("metrics.port", 8000),
    ("transport.kind", "ucx"), ("transport.lease_ttl_s", 30.0), ("transport.send_timeout_s", 30.0),
    ("autoscaler.enabled", False), ("autoscaler.interval_s", 10.0),
    ("autoscaler.ttft_slo_s", 1.0), ("autoscaler.tpot_slo_s", 0.1),
] + [(f"{pool}.{name}", value) for pool, seqs in (("prefill", 64), ("decode", 256), ("colocated", 256))
     for name, value in (("replicas", 1), ("num_cpus", 1.0), ("num_gpus", 0.0), ("resources", {}),
                         ("max_num_seqs", seqs), ("max_num_batched_tokens", 2048), ("block_size", 16),
                         ("kv_blocks", 1024), ("enable_prefix_caching", True),
                         ("price_per_hour", 0.0), ("torch_threads", None), ("threads", 1))
     ] + [(f"autoscaler.{pool}.{name}", value) for pool in ("prefill", "decode", "colocated")
          for name, value in (("min_replicas", 1), ("max_replicas", 4),
                              ("scale_up_utilization", 0.8), ("scale_down_utilization", 0.3))]


@pytest.mark.parametrize("path,expected", DEFAULTS, ids=[p for p, _ in DEFAULTS])
def test_default(path, expected):
    assert get(ClusterSpec(), path) == expected
    assert get(ClusterSpec.from_dict({}), path) == expected  # an empty file means the same


def test_partial_section_keeps_that_sections_defaults():
    spec = ClusterSpec.from_dict({"decode": {"replicas": 3}, "prefill": {"replicas": 2}})
    assert (spec.decode.replicas, spec.decode.max_num_seqs) == (3, 256)
    assert (spec.prefill.replicas, spec.prefill.max_num_seqs) == (2, 64)


ERRORS = [  # (spec dict, the error message it must give: field path first)
    ({"prefill": {"replicas": -1}}, "prefill.replicas: must be an integer >= 0, got -1"),
    ({"prefill": {"replicas": True}}, "prefill.replicas: must be an integer >= 0, got True"),
    ({"decode": {"replica": 2}}, "decode.replica: unknown field (did you mean replicas?)"),
    ({"replicas": 2}, "replicas: unknown field (known: model, dtype"),
    ({"router": {"tls": {"cert": "a"}}}, "router.tls.cert: unknown field (did you mean cert_file?)"),
    ({"router": {"port": "50051"}}, "router.port: must be an integer in 0..65535, got '50051'"),
    ({"router": {"port": 70000}}, "router.port: must be an integer in 0..65535, got 70000"),
    ({"router": {"max_pending_requests": 0}}, "router.max_pending_requests: must be an integer >= 1"),
    ({"router": {"request_timeout_s": 0}}, "router.request_timeout_s: must be a number > 0, got 0"),
    ({"router": {"num_cpus": -0.5}}, "router.num_cpus: must be a number >= 0, got -0.5"),
    ({"router": {"api_keys": "secret"}},
     "router.api_keys: must be a list of non-empty strings, got <hidden>"),
    ({"router": {"host": ""}}, "router.host: must be a non-empty string, got ''"),
    ({"router": 5}, "router: must be a mapping, got 5"),
    ({"router": {"tls": {"cert_file": "/nonexistent/c.pem", "key_file": "/nonexistent/k.pem"}}},
     "router.tls.cert_file: must be the path of an existing file, got '/nonexistent/c.pem'"),
    ({"router": {"tls": {"cert_file": "/nonexistent/c.pem"}}},
     "router.tls.key_file: required field is missing"),
    ({"metrics": {"port": 50051}}, "metrics.port: must differ from router.port, got 50051"),
    ({"transport": {"kind": "tcp"}}, "transport.kind: must be one of ucx, nccl, fake, got 'tcp'"),
    ({"transport": {"lease_ttl_s": float("nan")}}, "transport.lease_ttl_s: must be a number > 0, got nan"),
    ({"transport": {"kind": "nccl"}}, "prefill.num_gpus: transport nccl moves KV between GPUs"),
    ({"mode": "split"}, "mode: must be one of disaggregated, colocated, got 'split'"),
    ({"dtype": "fp8"}, "dtype: must be one of auto, float32, bfloat16, float16, got 'fp8'"),
    ({"device": "gpu"}, "device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"model": ""}, "model: must be a non-empty string, got ''"),
    ({"max_model_len": 0}, "max_model_len: must be an integer >= 1, got 0"),
    ({"decode": {"block_size": 24}}, "decode.block_size: must be a power of two, got 24"),
    ({"decode": {"kv_blocks": 0}}, "decode.kv_blocks: must be an integer >= 1, got 0"),
    ({"decode": {"enable_prefix_caching": "true"}},
     "decode.enable_prefix_caching: must be true or false, got 'true'"),
    ({"decode": {"torch_threads": 0}}, "decode.torch_threads: must be an integer >= 1, got 0"),
    ({"decode": {"price_per_hour": -1}}, "decode.price_per_hour: must be a number >= 0, got -1"),
    ({"prefill": {"resources": {"prefill": -1}}},
     "prefill.resources: must be a mapping of resource name to a number >= 0, got {'prefill': -1}"),
    ({"prefill": {"resources": {"GPU": 1}}}, "prefill.resources: must not name CPU, GPU or memory"),
    ({"colocated": {"num_gpus": -1}}, "colocated.num_gpus: must be a number >= 0, got -1"),
    ({"autoscaler": {"interval_s": 0}}, "autoscaler.interval_s: must be a number > 0, got 0"),
    ({"autoscaler": {"decode": {"scale_up_utilization": 1.5}}},
     "autoscaler.decode.scale_up_utilization: must be a number in (0, 1], got 1.5"),
    ({"autoscaler": {"decode": {"scale_down_utilization": 0.9}}},
     "autoscaler.decode.scale_down_utilization: must be < scale_up_utilization (0.8), got 0.9"),
    ({"autoscaler": {"prefill": {"min_replicas": 3, "max_replicas": 2}}},
     "autoscaler.prefill.min_replicas: must be <= max_replicas (2), got 3"),
    ({"autoscaler": {"enabled": True}, "decode": {"replicas": 5}},
     "decode.replicas: must lie within autoscaler.decode bounds [1, 4], got 5"),
    ([1, 2], "spec: must be a mapping, got list"),
]


@pytest.mark.parametrize("data,message", ERRORS,
                         ids=[f"{i}-{message.split(':')[0]}" for i, (_, message) in enumerate(ERRORS)])
def test_error_names_the_field(data, message):
    with pytest.raises(SpecError) as err:
        ClusterSpec.from_dict(data)
    assert str(err.value).startswith(message), str(err.value)
    assert isinstance(err.value, ValueError)


def test_autoscaler_bounds_ignored_when_disabled_and_for_inactive_pools():
    ClusterSpec.from_dict({"decode": {"replicas": 9}})  # autoscaler off: no bound applies
    ClusterSpec.from_dict({"autoscaler": {"enabled": True}, "mode": "colocated",
                           "decode": {"replicas": 9}})  # decode is not deployed in colocated mode


def test_secret_api_keys_stay_out_of_repr():
    spec = ClusterSpec.from_dict({"router": {"api_keys": ["hunter2"]}})
    assert spec.router.api_keys == ("hunter2",)
    assert "hunter2" not in repr(spec)


def test_frozen():
    spec = ClusterSpec.from_dict({"prefill": {"resources": {"prefill": 1}}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.prefill.replicas = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.prefill.resources["prefill"] = 2  # type: ignore[index]
    assert hash(spec) == hash(ClusterSpec.from_dict(spec.to_dict()))


def test_exposed_host_is_allowed_but_flagged():
    assert not ClusterSpec.from_dict({"router": {"host": "localhost"}}).router.exposed
    assert not ClusterSpec.from_dict({"router": {"host": "::1"}}).router.exposed
    spec = ClusterSpec.from_dict({"router": {"host": "0.0.0.0"}, "metrics": {"host": "10.0.0.5"}})
    assert spec.router.exposed and spec.metrics.exposed
    assert any("router.host 0.0.0.0" in w and "without tls or api_keys" in w for w in spec.warnings)
    assert ClusterSpec().warnings == []


def test_engine_config_for_a_pool():
    spec = ClusterSpec.from_dict({"model": "/m", "dtype": "float32", "device": "cpu", "max_model_len": 512,
                                  "decode": {"block_size": 32, "kv_blocks": 77, "max_num_seqs": 9,
                                             "max_num_batched_tokens": 333, "num_cpus": 1.5,
                                             "enable_prefix_caching": False}})
    cfg = spec.engine_config("decode")
    assert (cfg.model, cfg.dtype, cfg.device, cfg.max_model_len) == ("/m", "float32", "cpu", 512)
    assert (cfg.cache.block_size, cfg.cache.num_blocks, cfg.cache.enable_prefix_caching) == (32, 77, False)
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens) == (9, 333)
    assert cfg.num_threads == 2  # ceil(1.5 CPUs)
    assert spec.engine_config("prefill").scheduler.max_num_seqs == 64
    with pytest.raises(SpecError, match="router: unknown pool"):
        spec.engine_config("router")


def test_modes_choose_the_pools():
    spec = ClusterSpec.from_dict({"prefill": {"replicas": 2, "price_per_hour": 1.0},
                                  "decode": {"price_per_hour": 0.5}})
    assert list(spec.pools) == ["prefill", "decode"]
    assert spec.cost_per_hour == 2.5
    assert spec.required_cpus == 0.5 + 2 + 1
    colocated = dataclasses.replace(spec, mode="colocated")
    assert list(colocated.pools) == ["colocated"]


def test_yaml_round_trip(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert"), key.write_text("key")
    spec = ClusterSpec.from_dict({
        "model": "/models/x", "dtype": "bfloat16", "device": "cuda:1", "max_model_len": 4096,
        "router": {"host": "0.0.0.0", "port": 6000, "api_keys": ["a", "b"],
                   "tls": {"cert_file": str(cert), "key_file": str(key)}},
        "metrics": {"port": 0}, "transport": {"kind": "fake", "lease_ttl_s": 2.5},
        "prefill": {"replicas": 3, "resources": {"prefill": 1}, "torch_threads": 4},
        "decode": {"block_size": 32, "price_per_hour": 0.7},
        "autoscaler": {"enabled": True, "prefill": {"max_replicas": 8}, "tpot_slo_s": 0.05}})
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    assert load_spec(path) == spec
    assert ClusterSpec.from_dict(yaml.safe_load(spec.to_yaml())).to_dict() == spec.to_dict()
    assert spec.to_dict()["prefill"]["resources"] == {"prefill": 1.0}


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("router: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: not valid YAML"):
        load_spec(bad)
    bad.write_text("decode:\n  replicas: 1\n  replicas: 2\n")
    with pytest.raises(SpecError, match=r"bad.yaml: replicas: duplicate key \(line 3\)"):
        load_spec(bad)
    bad.write_text("decode:\n  replicas: -2\n")
    with pytest.raises(SpecError, match=r"bad.yaml: decode.replicas: must be an integer >= 0, got -2"):
        load_spec(bad)


def test_load_logs_warnings(tmp_path, caplog):
    path = tmp_path / "open.yaml"
    path.write_text("router:\n  host: 0.0.0.0\n")
    with caplog.at_level(logging.WARNING, logger="cluster.spec"):
        assert load_spec(path).router.exposed
    assert "not loopback" in caplog.text


def _shipped_specs() -> list[Path]:
    """The specs meant for this machine (spec-*.yaml are for `ray up` clusters of several nodes)."""
    return [REPO / "deploy" / "local.yaml", REPO / "deploy" / "colocated.yaml"]


@pytest.mark.parametrize("name", ["spec-cluster.yaml", "spec-gpu.yaml"])
def test_cluster_specs_load(name):
    spec = load_spec(REPO / "deploy" / name)
    assert spec.mode == "disaggregated" and spec.prefill.resources and spec.decode.resources


@pytest.mark.parametrize("path", _shipped_specs(), ids=lambda p: p.name)
def test_shipped_spec_loads_and_fits_this_machine(path):
    spec = load_spec(path)
    assert spec.warnings == []  # shipped specs listen on loopback only
    assert spec.required_cpus <= 2  # the 2-core box: Ray must be able to place every actor
    for name, pool in spec.pools.items():
        kv_bytes = pool.kv_blocks * pool.block_size * KV_BYTES_PER_TOKEN
        assert kv_bytes < 1.0e9, f"{name}: KV cache of {kv_bytes / 1e9:.2f} GB is not modest"
        assert pool.kv_blocks * pool.block_size >= 8192, f"{name}: cannot hold a full-context prompt"


def test_default_spec_is_local_yaml():
    assert DEFAULT_SPEC_PATH == REPO / "deploy" / "local.yaml"
    spec = load_spec(None)
    assert spec == load_spec(REPO / "deploy" / "local.yaml")
    assert (spec.mode, spec.prefill.replicas, spec.decode.replicas) == ("disaggregated", 1, 1)
    assert (spec.router.host, spec.router.port, spec.metrics.port) == ("127.0.0.1", 50051, 8000)
    colocated = load_spec(REPO / "deploy" / "colocated.yaml")
    assert (colocated.mode, colocated.colocated.replicas) == ("colocated", 2)
    # The baseline gets the same cores and KV memory as the disaggregated default.
    assert colocated.required_cpus == spec.required_cpus
    assert (colocated.colocated.replicas * colocated.colocated.kv_blocks
            == spec.prefill.kv_blocks + spec.decode.kv_blocks)
