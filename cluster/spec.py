"""The deployment spec: one YAML file -> a tree of frozen dataclasses, validated on load.

    spec = load_spec("deploy/local.yaml")       # None: deploy/local.yaml
    spec.pools                                  # {"prefill": PoolSpec, "decode": PoolSpec}
    spec.engine_config("decode")                # -> engine.config.EngineConfig

Every error is a SpecError whose message starts with the field's path
("prefill.replicas: must be an integer >= 0, got -1"); unknown keys are errors.
The field reference, with comments, is deploy/local.yaml.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.spec_checks import (Checked, Invalid, SpecError, boolean, choice, from_mapping, integer,
                                 number, optional, resource_map, section, spec_field, text,
                                 text_list, to_plain)
from engine.config import DTYPES, CacheConfig, ConfigError, EngineConfig, SchedulerConfig

__all__ = ["SpecError", "ClusterSpec", "RouterSpec", "TLSSpec", "MetricsSpec", "TransportSpec",
           "PoolSpec", "ScalingBounds", "AutoscalerSpec", "load_spec", "DEFAULT_SPEC_PATH"]

log = logging.getLogger(__name__)

DEFAULT_SPEC_PATH = Path(__file__).resolve().parent.parent / "deploy" / "local.yaml"
POOL_NAMES = ("prefill", "decode", "colocated")
PORT = integer(0, 65535)  # 0: any free port (tests)
DECODE_DEFAULTS = {"max_num_seqs": 256}  # decode batches are wide: it is memory-bound
WILDCARDS = {"0.0.0.0", "::"}  # binding these also binds every loopback address


def _device(value: Any) -> str:
    if value in ("auto", "cpu", "cuda") or (
            isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise Invalid("must be auto, cpu, cuda or cuda:N")


def _existing_file(value: Any) -> str:
    # Checked at load, not when the router starts listening: a typo'd certificate path
    # would otherwise surface minutes later on another node.
    if not isinstance(value, str) or not Path(value).expanduser().is_file():
        raise Invalid("must be the path of an existing file")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it resolves beyond this machine
        return False


@dataclass(frozen=True)
class TLSSpec(Checked):
    cert_file: str = spec_field(check=_existing_file)  # PEM certificate chain
    key_file: str = spec_field(check=_existing_file)  # PEM private key


@dataclass(frozen=True)
class RouterSpec(Checked):
    host: str = spec_field("127.0.0.1", text)
    port: int = spec_field(50051, PORT)
    max_pending_requests: int = spec_field(256, integer(1))  # beyond: RESOURCE_EXHAUSTED
    request_timeout_s: float = spec_field(600.0, number(0, lo_open=True))
    api_keys: tuple[str, ...] = spec_field((), text_list, secret=True)  # empty: no auth
    tls: TLSSpec | None = spec_field(None, optional(section(TLSSpec)))
    num_cpus: float = spec_field(0.5, number(0))  # Ray CPUs reserved for the router actor
    # On shutdown: stop admitting, let in-flight streams finish for up to this long
    drain_timeout_s: float = spec_field(30.0, number(0))

    @property
    def exposed(self) -> bool:
        """True when the gRPC API listens beyond this machine (an explicit choice)."""
        return not is_loopback(self.host)


@dataclass(frozen=True)
class MetricsSpec(Checked):
    host: str = spec_field("127.0.0.1", text)
    port: int = spec_field(8000, PORT)

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.host)


@dataclass(frozen=True)
class FaultSpec(Checked):
    """Failure injection on the KV link (chaos tests): per-message probabilities."""

    drop: float = spec_field(0.0, number(0, 1))  # the message vanishes: the lease must expire
    delay: float = spec_field(0.0, number(0, 1))  # the message arrives delay_s late
    delay_s: float = spec_field(0.0, number(0))
    corrupt: float = spec_field(0.0, number(0, 1))  # the header is damaged: it must be refused
    seed: int = spec_field(0, integer(0))


@dataclass(frozen=True)
class TransportSpec(Checked):
    kind: str = spec_field("ucx", choice("ucx", "nccl", "fake"))
    faults: FaultSpec | None = spec_field(None, optional(section(FaultSpec)))
    lease_ttl_s: float = spec_field(30.0, number(0, lo_open=True))  # reserved blocks wait this long
    send_timeout_s: float = spec_field(30.0, number(0, lo_open=True))  # one message's send


def _block_size(value: Any) -> int:
    value = integer(1)(value)
    if value & (value - 1):
        raise Invalid("must be a power of two")
    return value


@dataclass(frozen=True)
class PoolSpec(Checked):
    """One pool of identical workers (Ray actors) and the engine each one runs."""

    replicas: int = spec_field(1, integer(0))
    num_cpus: float = spec_field(1.0, number(0))
    num_gpus: float = spec_field(0.0, number(0))
    resources: Mapping[str, float] = spec_field(check=resource_map, factory=dict, hash=False)
    max_num_seqs: int = spec_field(64, integer(1))
    max_num_batched_tokens: int = spec_field(2048, integer(1))
    block_size: int = spec_field(16, _block_size)
    kv_blocks: int = spec_field(1024, integer(1))
    enable_prefix_caching: bool = spec_field(True, boolean)
    price_per_hour: float = spec_field(0.0, number(0))  # USD per replica-hour
    torch_threads: int | None = spec_field(None, optional(integer(1)))  # None: ceil(num_cpus)

    @property
    def threads(self) -> int:
        """torch intra-op threads: as many as the CPUs Ray reserves, so replicas don't fight."""
        return self.torch_threads or max(1, math.ceil(self.num_cpus))


@dataclass(frozen=True)
class ScalingBounds(Checked):
    """One pool's autoscaling range and the utilization band it keeps the pool in."""

    min_replicas: int = spec_field(1, integer(0))
    max_replicas: int = spec_field(4, integer(1))
    scale_up_utilization: float = spec_field(0.8, number(0, 1, lo_open=True))
    scale_down_utilization: float = spec_field(0.3, number(0, 1))

    def validate(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise SpecError(f"min_replicas: must be <= max_replicas ({self.max_replicas}), "
                            f"got {self.min_replicas}")
        if self.scale_down_utilization >= self.scale_up_utilization:
            raise SpecError(f"scale_down_utilization: must be < scale_up_utilization "
                            f"({self.scale_up_utilization:g}), got {self.scale_down_utilization:g}")


@dataclass(frozen=True)
class AutoscalerSpec(Checked):
    enabled: bool = spec_field(False, boolean)
    interval_s: float = spec_field(10.0, number(0, lo_open=True))
    ttft_slo_s: float = spec_field(1.0, number(0, lo_open=True))  # drives the prefill pool
    tpot_slo_s: float = spec_field(0.1, number(0, lo_open=True))  # drives the decode pool
    prefill: ScalingBounds = spec_field(check=section(ScalingBounds), factory=ScalingBounds)
    decode: ScalingBounds = spec_field(check=section(ScalingBounds), factory=ScalingBounds)
    colocated: ScalingBounds = spec_field(check=section(ScalingBounds), factory=ScalingBounds)


@dataclass(frozen=True)
class ClusterSpec(Checked):
    model: str = spec_field("default", text)  # "default" (embedded), a .gguf file or a HF dir
    dtype: str = spec_field("auto", choice("auto", *DTYPES))
    device: str = spec_field("auto", _device)
    max_model_len: int | None = spec_field(None, optional(integer(1)))  # None: the model's
    # colocated: one pool whose workers both prefill and decode (the benchmark's baseline)
    mode: str = spec_field("disaggregated", choice("disaggregated", "colocated"))
    router: RouterSpec = spec_field(check=section(RouterSpec), factory=RouterSpec)
    metrics: MetricsSpec = spec_field(check=section(MetricsSpec), factory=MetricsSpec)
    transport: TransportSpec = spec_field(check=section(TransportSpec), factory=TransportSpec)
    prefill: PoolSpec = spec_field(check=section(PoolSpec), factory=PoolSpec)
    decode: PoolSpec = spec_field(check=section(PoolSpec, **DECODE_DEFAULTS),
                                  factory=lambda: PoolSpec(**DECODE_DEFAULTS))
    colocated: PoolSpec = spec_field(check=section(PoolSpec, **DECODE_DEFAULTS),
                                     factory=lambda: PoolSpec(**DECODE_DEFAULTS))
    autoscaler: AutoscalerSpec = spec_field(check=section(AutoscalerSpec), factory=AutoscalerSpec)

    def validate(self) -> None:
        hosts = {self.router.host, self.metrics.host}
        if self.router.port == self.metrics.port != 0 and (len(hosts) == 1 or hosts & WILDCARDS):
            raise SpecError(f"metrics.port: must differ from router.port, got {self.metrics.port}")
        if self.mode == "disaggregated" and self.transport.kind == "nccl":
            for name in ("prefill", "decode"):
                if self.pool(name).num_gpus < 1:
                    raise SpecError(f"{name}.num_gpus: transport nccl moves KV between GPUs, so "
                                    f"each worker needs >= 1 GPU, got {self.pool(name).num_gpus:g}")
        for name, pool in self.pools.items():
            bounds: ScalingBounds = getattr(self.autoscaler, name)
            if self.autoscaler.enabled and not (
                    bounds.min_replicas <= pool.replicas <= bounds.max_replicas):
                raise SpecError(f"{name}.replicas: must lie within autoscaler.{name} bounds "
                                f"[{bounds.min_replicas}, {bounds.max_replicas}], got {pool.replicas}")
            try:  # the engine's own checks, as a backstop for anything not checked above
                self.engine_config(name)
            except ConfigError as e:
                raise SpecError(f"{name}: {e}") from None

    @property
    def pools(self) -> dict[str, PoolSpec]:
        """The pools this mode deploys, by name."""
        names = ("prefill", "decode") if self.mode == "disaggregated" else ("colocated",)
        return {name: self.pool(name) for name in names}

    def pool(self, name: str) -> PoolSpec:
        if name not in POOL_NAMES:
            raise SpecError(f"{name}: unknown pool (known: {', '.join(POOL_NAMES)})")
        return getattr(self, name)

    def engine_config(self, pool: str) -> EngineConfig:
        """What one worker of `pool` runs."""
        p = self.pool(pool)
        return EngineConfig(
            model=self.model, dtype=self.dtype, device=self.device, max_model_len=self.max_model_len,
            cache=CacheConfig(block_size=p.block_size, num_blocks=p.kv_blocks,
                              enable_prefix_caching=p.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=p.max_num_seqs,
                                      max_num_batched_tokens=p.max_num_batched_tokens),
            num_threads=p.threads)

    @property
    def required_cpus(self) -> float:
        """Ray CPUs the deployment reserves (router + every replica), to size a local head."""
        return self.router.num_cpus + sum(p.replicas * p.num_cpus for p in self.pools.values())

    @property
    def cost_per_hour(self) -> float:
        """USD per hour of the deployed pools at their spec'd replica counts."""
        return sum(p.replicas * p.price_per_hour for p in self.pools.values())

    @property
    def warnings(self) -> list[str]:
        """Legal but risky choices, for the CLI to print."""
        out = []
        if self.router.exposed:
            missing = [n for n, on in (("tls", self.router.tls), ("api_keys", self.router.api_keys))
                       if not on]
            out.append(f"router.host {self.router.host} is not loopback: the gRPC API is reachable "
                       f"from other machines" + (f" without {' or '.join(missing)}" if missing else ""))
        if self.metrics.exposed:
            out.append(f"metrics.host {self.metrics.host} is not loopback: metrics are public")
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ClusterSpec:
        try:
            return from_mapping(cls, data)
        except Invalid as e:
            raise SpecError(f"spec: {e}, got {type(data).__name__}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins; ClusterSpec.from_dict(spec.to_dict()) == spec."""
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader itself refuses it below, with its own message
            if key in seen:
                raise SpecError(f"{key}: duplicate key (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | os.PathLike | None = None) -> ClusterSpec:
    """Reads and validates a spec file; None reads deploy/local.yaml. Logs its warnings."""
    path = Path(path) if path is not None else DEFAULT_SPEC_PATH
    try:
        raw = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror or e})") from None
    try:
        data = yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
    try:
        spec = ClusterSpec.from_dict(data)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
    for warning in spec.warnings:
        log.warning("%s: %s", path, warning)
    return spec
