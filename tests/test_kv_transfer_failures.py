"""Failure paths of the handoff between real processes over real UCX: each ends FAILED
within its timeout, the decode pool's free blocks return to where they started, and
no process hangs."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from decode_worker.actor import RemoteDecodeWorker
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.sampling_params import SamplingParams
from kv_transfer.base import Lease
from kv_transfer.ucx_link import LinkConfig, LinkRefused, LinkSender
from kv_transfer.wire import WireHeader
from prefill_worker.actor import RemotePrefillWorker

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
LONG_PROMPT = list(range(1000, 2200))  # long enough to kill the sender mid-stream


def _cfg(model_dir, budget=2048):
    return EngineConfig(model=str(model_dir), cache=CacheConfig(16, 160),
                        scheduler=SchedulerConfig(max_num_batched_tokens=budget))


def _start(ray, cls, wid, cfg):
    actor = cls.options(num_cpus=0.5, max_restarts=0).remote(wid, cfg, "ucx", 30.0, 1, "127.0.0.1")
    info = ray.get(actor.ready.remote(), timeout=120)
    return actor, info


def _wait(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def decode(ray_local, model_dir):
    actor, info = _start(ray_local, RemoteDecodeWorker, "d-fail", _cfg(model_dir))
    yield actor, info
    ray_local.kill(actor)


def _used(ray, actor):
    return ray.get(actor.stats.remote(), timeout=30)["kv_blocks_used"]


def test_sender_killed_mid_stream_frees_the_lease(ray_local, model_dir, decode):
    actor, _ = decode
    prefill, pinfo = _start(ray_local, RemotePrefillWorker, "p-victim", _cfg(model_dir, budget=256))
    base = _used(ray_local, actor)
    lease = ray_local.get(actor.reserve.remote("victim", len(LONG_PROMPT)), timeout=30)
    prefill.prefill.remote("victim", LONG_PROMPT, PARAMS, lease)
    _wait(lambda: ray_local.get(actor.stats.remote())["bytes_received"] > 0, 120, "first layers")
    os.kill(pinfo["pid"], signal.SIGKILL)
    killed = time.monotonic()
    freed = _wait(lambda: _used(ray_local, actor) == base, 10, "blocks to return")
    stats = ray_local.get(actor.stats.remote(), timeout=30)
    assert stats["transfers_failed"] >= 1 and stats["pending_transfers"] == 0
    assert freed - killed < 10


def test_receiver_killed_mid_stream_fails_the_sender(ray_local, model_dir):
    victim, _ = _start(ray_local, RemoteDecodeWorker, "d-victim", _cfg(model_dir))
    vinfo = ray_local.get(victim.ready.remote(), timeout=30)
    prefill, _ = _start(ray_local, RemotePrefillWorker, "p-survivor", _cfg(model_dir, budget=256))
    lease = ray_local.get(victim.reserve.remote("orphan", len(LONG_PROMPT)), timeout=30)
    ref = prefill.prefill.remote("orphan", LONG_PROMPT, PARAMS, lease)
    _wait(lambda: ray_local.get(victim.stats.remote())["bytes_received"] > 0, 120, "first layers")
    os.kill(vinfo["pid"], signal.SIGKILL)
    with pytest.raises(Exception, match="TransferError|failed"):
        ray_local.get(ref, timeout=60)
    stats = ray_local.get(prefill.stats.remote(), timeout=30)
    assert stats["transfers_failed"] >= 1 and stats["kv_blocks_used"] == 0
    ray_local.kill(prefill)


def test_lease_expiry(ray_local, decode):
    actor, _ = decode
    base = _used(ray_local, actor)
    ray_local.get(actor.reserve.remote("late", 100, 0.3), timeout=30)
    assert _used(ray_local, actor) > base
    _wait(lambda: _used(ray_local, actor) == base, 5, "the lease to expire")
    assert ray_local.get(actor.stats.remote())["leases_expired"] >= 1


@pytest.fixture
def hostile_link():
    link = LinkSender(LinkConfig())
    yield link
    link.close()


def _layer(lease: Lease, token: bytes, fingerprint: str, kv_heads=3):
    kv = torch.zeros(2, 4, kv_heads, 64)
    return WireHeader.for_layer(lease.request_id, token, fingerprint, 0, 0, kv), kv


def test_stale_token_fingerprint_and_shape_are_refused(ray_local, decode, hostile_link):
    actor, _ = decode
    base = _used(ray_local, actor)
    lease = ray_local.get(actor.reserve.remote("guarded", 8), timeout=30)
    header, kv = _layer(lease, b"\x01" * 16, lease.model_fingerprint)
    with pytest.raises(LinkRefused, match="fencing token"):
        hostile_link.send(tuple(lease.address), header, kv)
    assert _used(ray_local, actor) > base  # a stray message cannot end someone's lease
    header, kv = _layer(lease, lease.fencing_token, "some-other-model")
    with pytest.raises(LinkRefused, match="fingerprint"):
        hostile_link.send(tuple(lease.address), header, kv)
    _wait(lambda: _used(ray_local, actor) == base, 5, "the mismatched lease to be freed")
    lease = ray_local.get(actor.reserve.remote("shape", 8), timeout=30)
    header, kv = _layer(lease, lease.fencing_token, lease.model_fingerprint, kv_heads=5)
    with pytest.raises(LinkRefused, match="does not fit"):
        hostile_link.send(tuple(lease.address), header, kv)
    _wait(lambda: _used(ray_local, actor) == base, 5, "the bad-shape lease to be freed")
    assert ray_local.get(actor.stats.remote())["messages_refused"] >= 3


def test_prefill_refuses_a_lease_for_another_model(ray_local, model_dir, decode):
    actor, _ = decode
    prefill, _ = _start(ray_local, RemotePrefillWorker, "p-fp", _cfg(model_dir))
    lease = ray_local.get(actor.reserve.remote("fp", 8), timeout=30)
    forged = Lease(**{**lease.__dict__, "model_fingerprint": "LlamaForCausalLM:other"})
    with pytest.raises(Exception, match="serves"):
        ray_local.get(prefill.prefill.remote("fp", list(range(1, 9)), PARAMS, forged), timeout=60)
    ray_local.get(actor.cancel.remote("fp"), timeout=30)
    ray_local.kill(prefill)
