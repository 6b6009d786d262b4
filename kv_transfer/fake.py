"""In-process link with the UCX link's contract, and failure injection, for fast tests.

`FakeListener` and `FakeLink` behave like LinkListener and LinkSender (see
ucx_link.py): the header goes through the real wire encoding, callbacks run one at
a time, a refusal reaches the sender as LinkRefused, a lost connection reaches the
listener's on_error with the requests left open on it. Faults, drawn from a
seeded RNG per message:
    drop     the message silently vanishes (the lease must expire)
    delay    the message arrives `delay_s` late
    corrupt  the header is damaged in flight (the connection is torn down)
and `kill()` on either end makes it vanish mid-stream like a kill -9.
"""
from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass

import torch

from kv_transfer.base import Address
from kv_transfer.ucx_link_common import LinkPeerLost, LinkRefused, byte_view
from kv_transfer.wire import MessageKind, WireError, WireHeader, pack, unpack


@dataclass(frozen=True)
class Faults:
    drop: float = 0.0
    delay: float = 0.0
    delay_s: float = 0.0
    corrupt: float = 0.0
    seed: int = 0


class FakeNetwork:
    def __init__(self):
        self.listeners: dict[Address, FakeListener] = {}
        self._ports = itertools.count(1)
        self.lock = threading.Lock()


DEFAULT_NETWORK = FakeNetwork()


class FakeListener:
    def __init__(self, on_header, on_payload, on_error=None, *, network: FakeNetwork = DEFAULT_NETWORK):
        self.on_header, self.on_payload, self.on_error = on_header, on_payload, on_error
        self.network = network
        self._address = ("fake", next(network._ports))
        self._lock = threading.Lock()  # callbacks one at a time, like the listener thread
        self.open_requests: dict[int, set[str]] = {}  # per sender: LAYERs landed, no DONE/ABORT
        self.alive = True
        network.listeners[self._address] = self

    @property
    def address(self) -> Address:
        return self._address

    def close(self, timeout_s: float = 5.0) -> None:
        self.alive = False
        self.network.listeners.pop(self._address, None)

    kill = close

    def connection_lost(self, sender_id: int, reason: str, header: WireHeader | None = None) -> None:
        with self._lock:
            open_ids = frozenset(self.open_requests.pop(sender_id, set()))
            if header is not None:
                open_ids |= {header.request_id}
            if self.on_error is not None and open_ids:
                self.on_error(LinkPeerLost(reason, peer=sender_id, header=header,
                                           request_ids=open_ids))

    def deliver(self, sender_id: int, header: WireHeader, payload: torch.Tensor | None) -> None:
        with self._lock:
            target = None
            if header.payload_nbytes:
                target = self.on_header(header)  # LinkRefused propagates to the sender
                if target is None:
                    raise LinkRefused("refused by the receiver")
                landing = byte_view(target, writable=True)
                if landing.nbytes != header.payload_nbytes:
                    raise LinkRefused(f"receive buffer is {landing.nbytes} bytes, "
                                      f"message needs {header.payload_nbytes}")
                landing[:] = byte_view(payload.contiguous(), writable=False)
            self.on_payload(header, target)
            opened = self.open_requests.setdefault(sender_id, set())
            if header.kind is MessageKind.LAYER:
                opened.add(header.request_id)
            else:
                opened.discard(header.request_id)


class FakeLink:
    """The sending end; thread-safe like LinkSender."""

    _ids = itertools.count(1)

    def __init__(self, faults: Faults = Faults(), *, network: FakeNetwork = DEFAULT_NETWORK):
        self.faults = faults
        self.network = network
        self.id = next(self._ids)
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        self._peers: set[Address] = set()
        self.alive = True
        self.sent = self.dropped = self.delayed = self.corrupted = 0

    def send(self, address: Address, header: WireHeader, payload=None,
             timeout_s: float | None = None) -> None:
        with self._lock:
            if not self.alive:
                raise LinkPeerLost("this sender was killed")
            listener = self.network.listeners.get(address)
            if listener is None or not listener.alive:
                raise LinkPeerLost(f"connection to {address} reset: the receiver is gone",
                                   header=header, request_ids=frozenset({header.request_id}))
            self._peers.add(address)
            roll = self._rng.random
            if roll() < self.faults.drop:
                self.dropped += 1
                return
            if roll() < self.faults.delay:
                self.delayed += 1
                time.sleep(self.faults.delay_s)
            raw = pack(header)
            if roll() < self.faults.corrupt:
                self.corrupted += 1
                raw = raw[:20] + bytes([raw[20] ^ 0xFF]) + raw[21:]
            try:
                header = unpack(raw)
            except WireError as exc:  # the listener drops the connection on a bad header
                listener.connection_lost(self.id, f"protocol error: {exc}")
                raise LinkPeerLost(f"connection to {address} dropped: {exc}",
                                   request_ids=frozenset({header.request_id})) from None
            listener.deliver(self.id, header, payload)
            self.sent += 1

    def kill(self) -> None:
        """Vanish like a killed process: every receiver sees the connection reset."""
        self.alive = False
        for address in self._peers:
            listener = self.network.listeners.get(address)
            if listener is not None:
                listener.connection_lost(self.id, "connection reset by peer (killed)")

    def close(self) -> None:
        self.alive = False
