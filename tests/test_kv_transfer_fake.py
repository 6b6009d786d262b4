"""The handoff's state machine and layout on the in-process fake link, every failure path."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.kv_cache import KVCache
from kv_transfer.base import TransferError, TransferState
from kv_transfer.fake import FakeLink, FakeListener, FakeNetwork, Faults
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.store import KVCacheStore
from kv_transfer.wire import WireHeader

LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 4
MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=50, hidden_size=8,
                    intermediate_size=16, num_layers=LAYERS, num_heads=2, num_kv_heads=KV_HEADS,
                    head_dim=HEAD_DIM)
FP = MODEL.fingerprint


def make_cache(block_size, num_blocks=16):
    return KVCache(MODEL, CacheConfig(block_size, num_blocks), torch.float32, torch.device("cpu"))


@pytest.fixture
def net():
    return FakeNetwork()


@pytest.fixture
def receiver(net):
    kv = make_cache(block_size=8)
    rx = KVReceiver(KVCacheStore(kv, threading.Lock()),
                    lambda h, p, e: FakeListener(h, p, e, network=net),
                    model_fingerprint=FP, num_layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                    lease_ttl_s=5.0, reap_interval_s=0.01)
    yield rx
    rx.close()


def push(transfer, layers_kv, chunks=(0,), first_token=7):
    """Send every layer, split at the given token offsets, like a chunked prefill."""
    n = layers_kv[0].shape[1]
    bounds = list(chunks) + [n]
    for a, b in zip(bounds, bounds[1:]):
        for layer, kv in enumerate(layers_kv):
            transfer.sink(transfer.lease.request_id, layer, a, b, kv[:, a:b].clone())
    transfer.finish(first_token)


def random_kv(n):
    return [torch.randn(2, n, KV_HEADS, HEAD_DIM) for _ in range(LAYERS)]


def test_states_are_ordered():
    S = TransferState
    assert S.RESERVED < S.TRANSFERRING < S.READY < S.FAILED
    assert S.FAILED.terminal and S.EXPIRED.terminal and not S.READY.terminal


def test_layers_land_in_the_receivers_blocks_across_block_sizes(net, receiver):
    free0 = receiver.store.kv.pool.num_free
    lease = receiver.reserve("r1", 21)
    assert receiver.state("r1") == TransferState.RESERVED
    assert len(lease.block_ids) == 3 and receiver.store.kv.pool.num_free == free0 - 3
    sender = KVSender(FakeLink(network=net))
    data = random_kv(21)
    transfer = sender.open(lease)
    push(transfer, data, chunks=(0, 5, 16))
    transfer.wait(5)
    assert receiver.wait("r1", 5) == TransferState.READY
    blocks, first = receiver.take("r1")
    assert first == 7 and blocks == list(lease.block_ids)
    for layer in range(LAYERS):
        assert torch.equal(receiver.store.kv.read_tokens(layer, blocks, 0, 21), data[layer])
    # a prefill cache with another block size reads back the same bytes it sent
    src = make_cache(block_size=4)
    src_blocks = src.pool.allocate(6)
    src.write_tokens(0, src_blocks, 0, data[0])
    assert torch.equal(src.read_tokens(0, src_blocks, 0, 21), data[0])
    assert sender.stats.bytes_sent == 21 * 2 * KV_HEADS * HEAD_DIM * 4 * LAYERS
    sender.close()


def test_wrong_fencing_token_is_refused_and_the_lease_survives(net, receiver):
    lease = receiver.reserve("r1", 4)
    link = FakeLink(network=net)
    bad = WireHeader.for_layer("r1", b"\x00" * 16, FP, 0, 0, torch.zeros(2, 4, KV_HEADS, HEAD_DIM))
    with pytest.raises(Exception, match="fencing token"):
        link.send(lease.address, bad, torch.zeros(2, 4, KV_HEADS, HEAD_DIM))
    assert receiver.state("r1") == TransferState.RESERVED
    assert receiver.stats.messages_refused == 1


def test_stale_token_after_a_new_lease_is_refused(net, receiver):
    old = receiver.reserve("r1", 4)
    receiver.cancel("r1")
    new = receiver.reserve("r1", 4)
    sender = KVSender(FakeLink(network=net))
    stale = sender.open(old)
    push(stale, random_kv(4))
    with pytest.raises(TransferError, match="fencing token"):
        stale.wait(5)
    assert receiver.state("r1") == TransferState.RESERVED
    assert new.fencing_token != old.fencing_token
    sender.close()


def test_fingerprint_mismatch_fails_and_frees(net, receiver):
    free0 = receiver.store.kv.pool.num_free
    lease = receiver.reserve("r1", 4)
    other = type(lease)(**{**lease.__dict__, "model_fingerprint": "another-model"})
    sender = KVSender(FakeLink(network=net))
    t = sender.open(other)
    push(t, random_kv(4))
    with pytest.raises(TransferError, match="fingerprint"):
        t.wait(5)
    assert receiver.state("r1") == TransferState.FAILED
    assert "fingerprint" in receiver.error("r1")
    assert receiver.store.kv.pool.num_free == free0
    sender.close()


def test_shape_mismatch_is_refused_never_written(net, receiver):
    free0 = receiver.store.kv.pool.num_free
    lease = receiver.reserve("r1", 4)
    sender = KVSender(FakeLink(network=net))
    t = sender.open(lease)
    t.sink("r1", 0, 0, 4, torch.randn(2, 4, KV_HEADS + 1, HEAD_DIM))
    t.finish(1)
    with pytest.raises(TransferError, match="does not fit"):
        t.wait(5)
    assert receiver.state("r1") == TransferState.FAILED
    assert receiver.store.kv.pool.num_free == free0
    sender.close()


def test_out_of_order_tokens_fail(net, receiver):
    lease = receiver.reserve("r1", 8)
    sender = KVSender(FakeLink(network=net))
    t = sender.open(lease)
    t.sink("r1", 0, 4, 8, torch.randn(2, 4, KV_HEADS, HEAD_DIM))  # skips tokens 0..3
    t.finish(1)
    with pytest.raises(TransferError, match="expected 0"):
        t.wait(5)
    assert receiver.state("r1") == TransferState.FAILED
    sender.close()


def test_done_before_all_layers_fails(net, receiver):
    lease = receiver.reserve("r1", 4)
    sender = KVSender(FakeLink(network=net))
    t = sender.open(lease)
    t.sink("r1", 0, 0, 4, torch.randn(2, 4, KV_HEADS, HEAD_DIM))
    t.finish(1)
    with pytest.raises(TransferError, match="incomplete|before layers"):
        t.wait(5)
    assert receiver.state("r1") == TransferState.FAILED
    sender.close()


def test_lease_expiry_frees_blocks_and_fails_the_sender(net, receiver):
    free0 = receiver.store.kv.pool.num_free
    lease = receiver.reserve("r1", 4, ttl_s=0.05)
    time.sleep(0.2)
    assert receiver.state("r1") == TransferState.EXPIRED
    assert receiver.store.kv.pool.num_free == free0 and receiver.stats.leases_expired == 1
    sender = KVSender(FakeLink(network=net))
    t = sender.open(lease)
    push(t, random_kv(4))
    with pytest.raises(TransferError, match="no live lease"):
        t.wait(5)
    sender.close()


def test_dropped_done_ends_in_expiry(net, receiver):
    free0 = receiver.store.kv.pool.num_free
    lease = receiver.reserve("r1", 4, ttl_s=0.3)
    link = FakeLink(Faults(drop=1.0), network=net)
    sender = KVSender(link)
    t = sender.open(lease)
    push(t, random_kv(4))
    t.wait(5)  # the sender cannot tell: every message "went out"
    assert receiver.wait("r1", 2) == TransferState.EXPIRED
    assert receiver.store.kv.pool.num_free == free0 and link.dropped == LAYERS + 1
    sender.close()


def test_sender_killed_mid_stream(net, receiver):
    free0 = receiver.store.kv.pool.num_free
    lease = receiver.reserve("r1", 4)
    link = FakeLink(network=net)
    sender = KVSender(link)
    t = sender.open(lease)
    data = random_kv(4)
    t.sink("r1", 0, 0, 4, data[0])
    deadline = time.time() + 5
    while receiver.state("r1") != TransferState.TRANSFERRING and time.time() < deadline:
        time.sleep(0.01)
    link.kill()
    assert receiver.state("r1") == TransferState.FAILED
    assert "connection" in receiver.error("r1")
    assert receiver.store.kv.pool.num_free == free0
    sender.close()


def test_receiver_killed_mid_stream(net, receiver):
    lease = receiver.reserve("r1", 4)
    sender = KVSender(FakeLink(network=net))
    t = sender.open(lease)
    receiver.listener.kill()
    push(t, random_kv(4))
    with pytest.raises(TransferError, match="reset"):
        t.wait(5)
    sender.close()


def test_corrupt_header_drops_the_connection_and_fails_open_requests(net, receiver):
    free0 = receiver.store.kv.pool.num_free
    lease = receiver.reserve("r1", 4)
    link = FakeLink(network=net)
    data = random_kv(4)
    link.send(lease.address, WireHeader.for_layer("r1", lease.fencing_token, FP, 0, 0, data[0]),
              data[0])
    link.faults = Faults(corrupt=1.0)
    with pytest.raises(Exception, match="dropped"):
        link.send(lease.address, WireHeader.for_layer("r1", lease.fencing_token, FP, 1, 0, data[1]),
                  data[1])
    assert receiver.state("r1") == TransferState.FAILED
    assert receiver.store.kv.pool.num_free == free0


def test_cancel_from_either_side(net, receiver):
    free0 = receiver.store.kv.pool.num_free
    receiver.reserve("a", 4)
    b = receiver.reserve("b", 4)
    assert receiver.cancel("a", "client went away")
    assert not receiver.cancel("a")  # idempotent
    sender = KVSender(FakeLink(network=net))
    tb = sender.open(b)
    tb.abort("prefill worker shutting down")
    with pytest.raises(TransferError, match="shutting down"):
        tb.wait(5)
    deadline = time.time() + 5
    while receiver.state("b") != TransferState.FAILED and time.time() < deadline:
        time.sleep(0.01)
    assert receiver.state("a") == receiver.state("b") == TransferState.FAILED
    assert receiver.store.kv.pool.num_free == free0
    sender.close()


def test_take_requires_ready(receiver):
    receiver.reserve("r1", 4)
    with pytest.raises(ValueError, match="RESERVED, not READY"):
        receiver.take("r1")


def test_reserve_with_no_room_raises_and_holds_nothing(receiver):
    free0 = receiver.store.kv.pool.num_free
    with pytest.raises(Exception, match="KV blocks"):
        receiver.reserve("big", 8 * 100)
    assert receiver.store.kv.pool.num_free == free0


def test_injected_faults_never_leak_blocks(net, receiver):
    """Many transfers under random drop/delay/corrupt: each ends READY or reclaimed."""
    free0 = receiver.store.kv.pool.num_free
    link = FakeLink(Faults(drop=0.05, delay=0.05, delay_s=0.01, corrupt=0.05, seed=3), network=net)
    sender = KVSender(link)
    outcomes = []
    for i in range(40):
        lease = receiver.reserve(f"r{i}", 5, ttl_s=0.5)
        t = sender.open(lease)
        push(t, random_kv(5))
        try:
            t.wait(5)
        except TransferError:
            pass
        state = receiver.wait(f"r{i}", 2)
        if state == TransferState.READY:
            blocks, _ = receiver.take(f"r{i}")
            receiver.store.free(blocks)
        outcomes.append(state)
    deadline = time.time() + 3
    while receiver.num_pending and time.time() < deadline:
        time.sleep(0.05)
    assert receiver.store.kv.pool.num_free == free0
    assert TransferState.READY in outcomes and set(outcomes) - {TransferState.READY}
    sender.close()
