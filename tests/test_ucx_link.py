"""The UCX link between real processes on loopback: delivery, refusal, bad input, kill -9.

UCX never starts in the pytest process: a receiver and a sender each run in a
spawned child ("agent") driven over a pipe, and are torn down by handle.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any, Callable

import pytest

pytestmark = pytest.mark.timeout(180)  # a hang guard; the suite takes ~20 s on a quiet host

RECEIVER_CONFIG = dict(message_timeout_s=3.0)
SENDER_CONFIG = dict(send_timeout_s=10.0)
DETECT_S = 3.0  # a killed peer must be noticed well within this (measured ~0.1 s)
BIG = dict(tokens=8192, heads=8, dim=128)  # 32 MiB of bf16 per message


# ---- agents (run in spawned children) --------------------------------------

def _digest(buffer: Any) -> str:
    from kv_transfer.ucx_link_common import byte_view

    return hashlib.sha256(byte_view(buffer, writable=False)).hexdigest()


def _receiver_agent(pipe: Any, config: dict) -> None:
    import torch

    from kv_transfer.ucx_link import LinkConfig, LinkListener, LinkRefused

    lock = threading.Lock()

    def emit(*event: Any) -> None:
        with lock:
            pipe.send(event)

    def on_header(h):
        emit("header", h.request_id, h.layer)
        if h.request_id.startswith("refuse"):
            return None
        if h.request_id.startswith("reject"):
            raise LinkRefused("fingerprint mismatch")
        if h.request_id.startswith("short-buffer"):
            return torch.empty(h.payload_nbytes - 2, dtype=torch.uint8)
        return torch.empty(h.shape, dtype=h.dtype.torch)

    def on_payload(h, buffer):
        emit("landed", h.request_id, h.layer, h.kind.name,
             None if buffer is None else _digest(buffer), h.first_token)

    def on_error(error):
        emit("error", sorted(error.request_ids),
             error.header.request_id if error.header else None, str(error), time.time())

    listener = LinkListener(on_header, on_payload, on_error, config=LinkConfig(**config))
    emit("address", listener.address)
    while (command := pipe.recv()) != "stop":
        if command == "status":
            emit("status", listener.alive, listener.num_connections, listener.garbage_frames)
    listener.close()


def _make_message(spec: dict) -> tuple[Any, Any]:
    import torch

    from kv_transfer.wire import MessageKind, WireHeader

    token = spec.get("token", 7).to_bytes(16, "little")
    if spec.get("kind", "LAYER") != "LAYER":
        return WireHeader(MessageKind[spec["kind"]], spec["rid"], token, "fp",
                          first_token=spec.get("first_token", -1)), None
    generator = torch.Generator().manual_seed(spec.get("seed", 0))
    kv = torch.randn(2, spec.get("tokens", 64), spec.get("heads", 3), spec.get("dim", 64),
                     generator=generator).to(getattr(torch, spec.get("dtype", "bfloat16")))
    return WireHeader.for_layer(spec["rid"], token, "fp", spec.get("layer", 0), 0, kv), kv


def _send_tampered(sender: Any, address: tuple, spec: dict) -> None:
    """Send a message whose payload disagrees with its header (LinkSender refuses to)."""
    import numpy as np

    from kv_transfer.ucx_link_common import byte_view

    header, kv = _make_message(spec)
    data = byte_view(kv, writable=False)
    tampered = {"short_payload": data[: data.nbytes // 2],
                "long_payload": np.concatenate([data, data[:4096]]),
                "no_payload": None}[spec["tamper"]]
    original = sender._check_payload
    sender._check_payload = lambda h, p: tampered
    try:
        sender.send(address, header, kv)
    finally:
        sender._check_payload = original


def _send_garbage_frame(sender: Any, address: tuple) -> None:
    import numpy as np

    from kv_transfer.ucx_link import LinkPeerLost
    from kv_transfer.ucx_link_common import ACK_SIZE, FRAME_SIZE, progress_until, ucx_array

    with sender._lock:
        peer = sender._peer(address)
        frame = np.frombuffer(os.urandom(FRAME_SIZE), dtype=np.uint8).copy()
        ack = np.zeros(ACK_SIZE, dtype=np.uint8)
        requests = [peer.ep.stream_recv(ucx_array(ack)), peer.ep.stream_send(ucx_array(frame))]
        progress_until(sender._worker, lambda: peer.closed.reason is not None,
                       time.monotonic() + 10, 0.05)
        reason = peer.closed.reason  # set once the receiver hangs up on us
        sender._drop(peer, requests, [ack, frame])
    if reason is None:
        raise RuntimeError("the receiver kept a connection that sent garbage")
    raise LinkPeerLost(f"after garbage: {reason}")


def _sender_agent(pipe: Any, config: dict) -> None:
    from kv_transfer.ucx_link import LinkConfig, LinkSender

    sender = LinkSender(LinkConfig(**config))
    pipe.send(("ready",))
    while (command := pipe.recv())[0] != "stop":
        name, address, spec = command
        started = time.time()
        try:
            if name == "send":
                header, kv = _make_message(spec)
                sender.send(address, header, kv)
                pipe.send(("ok", None if kv is None else _digest(kv)))
            elif name == "tampered":
                _send_tampered(sender, address, spec)
                pipe.send(("ok", None))
            elif name == "garbage":
                _send_garbage_frame(sender, address)
            elif name == "send_fresh":  # the same, over a brand-new connection
                header, kv = _make_message(spec)
                with LinkSender(LinkConfig(**config)) as fresh:
                    fresh.send(address, header, kv)
                pipe.send(("ok", _digest(kv)))
            elif name == "stream":  # LAYERs back to back until something fails
                header, kv = _make_message(spec)
                for layer in range(spec["count"]):
                    sender.send(address, header, kv)
                    if layer == 0:
                        pipe.send(("streaming",))
                pipe.send(("ok", None))
        except Exception as e:
            pipe.send(("error", type(e).__name__, str(e), time.time() - started, time.time()))
    sender.close()


# ---- the test side ------------------------------------------------------------

class Agent:
    """A spawned child running one end of the link, driven over a pipe."""

    def __init__(self, target: Callable, config: dict) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child, config), daemon=True)
        self.process.start()
        self.events: list[tuple] = []
        self._first: tuple | None = None

    def first(self) -> tuple:
        """The agent's first message (address or ready), waiting for start-up."""
        if self._first is None:
            self._first = self.next(timeout=60)
        return self._first

    def next(self, timeout: float = 60) -> tuple:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"agent {self.process.pid} said nothing for {timeout} s")
        return self.pipe.recv()

    def wait_for(self, predicate: Callable[[tuple], bool], timeout: float = 60) -> tuple:
        """First not-yet-seen event matching `predicate` (others are kept)."""
        for i, event in enumerate(self.events):
            if predicate(event):
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            event = self.next(left)
            if predicate(event):
                return event
            self.events.append(event)
        raise TimeoutError(f"no matching event within {timeout} s; saw {self.events[-5:]}")

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self, message: Any = "stop") -> None:
        if self.process.is_alive():
            try:
                self.pipe.send(message)
            except OSError:
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.kill()


class Receiver(Agent):
    def __init__(self, **config: Any) -> None:
        super().__init__(_receiver_agent, {**RECEIVER_CONFIG, **config})

    @property
    def address(self) -> tuple:
        return tuple(self.first()[1])

    def landed(self, rid: str, layer: int = 0) -> tuple:
        return self.wait_for(lambda e: e[0] == "landed" and e[1:3] == (rid, layer))


class Sender(Agent):
    def __init__(self, **config: Any) -> None:
        super().__init__(_sender_agent, {**SENDER_CONFIG, **config})

    def call(self, name: str, address: tuple, spec: dict | None = None,
             timeout: float = 60) -> tuple:
        self.first()
        self.pipe.send((name, address, spec or {}))
        return self.next(timeout)

    def stop(self, message: Any = ("stop",)) -> None:
        super().stop(message)


@pytest.fixture(scope="module")
def agents():
    """Every process the module needs, spawned at once so their start-ups overlap."""
    spawned = {"receiver": Receiver(), "sender": Sender(),
               "victim": Sender(), "doomed": Receiver()}
    yield spawned
    for agent in spawned.values():
        agent.stop()


@pytest.fixture
def receiver(agents):
    return agents["receiver"]


@pytest.fixture
def sender(agents):
    return agents["sender"]


def send_and_check(sender: Sender, receiver: Receiver, how: str = "send", **spec: Any) -> None:
    reply = sender.call(how, receiver.address, spec)
    assert reply[0] == "ok", reply
    landed = receiver.landed(spec["rid"], spec.get("layer", 0))
    assert landed[4] == reply[1], "payload did not land byte-exact"


def test_messages_land_byte_exact(sender: Sender, receiver: Receiver) -> None:
    send_and_check(sender, receiver, rid="exact-1", layer=0, tokens=1, seed=1)
    send_and_check(sender, receiver, rid="exact-1", layer=1, tokens=300, seed=2)
    send_and_check(sender, receiver, rid="exact-1", layer=2, tokens=2048, heads=8, dim=128,
                   seed=3)  # 8 MiB
    send_and_check(sender, receiver, rid="exact-2", tokens=77, dtype="float32", seed=4)
    send_and_check(sender, receiver, rid="exact-3", tokens=5, dtype="float16", seed=5)
    assert sender.call("send", receiver.address,
                       dict(rid="exact-1", kind="DONE", first_token=42)) == ("ok", None)
    assert receiver.landed("exact-1")[3:] == ("DONE", None, 42)


@pytest.mark.parametrize("rid, reason", [
    ("refuse-1", "refused by the receiver"),
    ("reject-1", "fingerprint mismatch"),
    ("short-buffer-1", "receive buffer is"),
])
def test_refused_message_leaves_listener_healthy(sender: Sender, receiver: Receiver,
                                                 rid: str, reason: str) -> None:
    for spec in (dict(rid=rid), dict(rid=rid, tokens=4096, heads=8, dim=128)):  # + 16 MiB
        reply = sender.call("send", receiver.address, spec)
        assert reply[:2] == ("error", "LinkRefused") and reason in reply[2], reply
    send_and_check(sender, receiver, rid=f"after-{rid}", tokens=500, seed=6)


@pytest.mark.parametrize("tamper", ["short_payload", "long_payload"])
def test_payload_size_mismatch_is_refused(sender: Sender, receiver: Receiver,
                                          tamper: str) -> None:
    reply = sender.call("tampered", receiver.address,
                        dict(rid=f"mismatch-{tamper}", tokens=1024, tamper=tamper))
    assert reply[:2] == ("error", "LinkRefused") and "header says" in reply[2], reply
    send_and_check(sender, receiver, rid=f"after-{tamper}", tokens=64, seed=7)


def test_missing_payload_times_out_and_fails_the_request(sender: Sender,
                                                         receiver: Receiver) -> None:
    reply = sender.call("tampered", receiver.address,
                        dict(rid="truncated-1", tokens=64, tamper="no_payload"))
    assert reply[:2] == ("error", "LinkPeerLost"), reply
    error = receiver.wait_for(lambda e: e[0] == "error" and e[2] == "truncated-1")
    assert "timed out" in error[3] and "truncated-1" in error[1]
    send_and_check(sender, receiver, rid="after-truncated", tokens=64, seed=8)


def test_garbage_header_drops_only_that_connection(sender: Sender,
                                                   receiver: Receiver) -> None:
    def garbage_frames() -> int:
        receiver.pipe.send("status")
        return receiver.wait_for(lambda e: e[0] == "status")[3]

    before = garbage_frames()
    reply = sender.call("garbage", receiver.address)
    assert reply[:2] == ("error", "LinkPeerLost"), reply
    send_and_check(sender, receiver, rid="after-garbage", tokens=64, seed=9)
    assert garbage_frames() == before + 1  # dropped with a count, not a crash


def test_kill_sender_mid_stream(sender: Sender, receiver: Receiver, agents: dict) -> None:
    victim = agents["victim"]
    try:
        victim.call("send", receiver.address, dict(rid="victim", layer=99))  # connect
        victim.pipe.send(("stream", receiver.address, dict(rid="victim", count=10**6, **BIG)))
        assert victim.next()[0] == "streaming"
        # Another connection works meanwhile.
        send_and_check(sender, receiver, rid="concurrent", tokens=1000, seed=10)
        receiver.wait_for(lambda e: e[0] == "header" and e[1] == "victim" and e[2] == 0)
        killed_at = time.time()
        victim.kill()
        error = receiver.wait_for(lambda e: e[0] == "error" and "victim" in e[1])
        print(f"receiver noticed the killed sender after {error[4] - killed_at:.3f} s: {error}")
        assert error[4] - killed_at < DETECT_S, f"noticed after {error[4] - killed_at:.2f} s"
        receiver.pipe.send("status")
        assert receiver.wait_for(lambda e: e[0] == "status")[1] is True
        # A new connection is accepted and works.
        send_and_check(sender, receiver, "send_fresh", rid="after-kill", tokens=128, seed=11)
    finally:
        victim.stop()


def test_kill_receiver_mid_stream(sender: Sender, receiver: Receiver, agents: dict) -> None:
    doomed = agents["doomed"]
    try:
        sender.pipe.send(("stream", doomed.address, dict(rid="doomed", count=10**6, **BIG)))
        assert sender.next()[0] == "streaming"
        doomed.wait_for(lambda e: e[0] == "header" and e[1] == "doomed")
        killed_at = time.time()
        doomed.kill()
        reply = sender.next(timeout=30)
        assert reply[:2] == ("error", "LinkPeerLost"), reply
        print(f"sender noticed the killed receiver after {reply[4] - killed_at:.3f} s: {reply}")
        assert reply[4] - killed_at < DETECT_S, f"noticed after {reply[4] - killed_at:.2f} s"
        # Nothing listens there any more: a new send fails fast instead of hanging.
        reply = sender.call("send", doomed.address, dict(rid="to-the-dead"))
        print(f"send to the dead address: {reply}")
        assert reply[0] == "error" and reply[1] in ("LinkPeerLost", "LinkTimeout"), reply
        assert reply[3] < SENDER_CONFIG["send_timeout_s"] + 2
    finally:
        doomed.stop()
    send_and_check(sender, receiver, rid="after-receiver-kill", tokens=64, seed=12)


def test_config_defaults_yield_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from kv_transfer.ucx_link import LinkConfig

    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    monkeypatch.delenv("UCX_MM_FIFO_SIZE", raising=False)
    options = LinkConfig().resolved_ucx_options()
    assert options["NET_DEVICES"] == "lo" and options["MM_ERROR_HANDLING"] == "n"
    monkeypatch.setenv("UCX_NET_DEVICES", "eth0")
    monkeypatch.setenv("UCX_MM_FIFO_SIZE", "64")
    options = LinkConfig(shared_memory=True, ucx_options=(("TLS", "tcp"),)).resolved_ucx_options()
    assert "NET_DEVICES" not in options and "MM_FIFO_SIZE" not in options
    assert options["TLS"] == "tcp" and options["MM_ERROR_HANDLING"] == "y"
    with pytest.raises(ValueError, match="send_timeout_s"):
        LinkConfig(send_timeout_s=0)
