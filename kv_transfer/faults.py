"""Failure injection around any link, so the chaos suite can break the real UCX path.

Per message, drawn from a seeded RNG: `drop` skips the send (the receiver never sees it and
its lease must expire), `delay` sleeps `delay_s` first (past a lease, it is refused),
`corrupt` damages the header's fencing token (the receiver must refuse it, never write it).
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time

from kv_transfer.base import Address, Link
from kv_transfer.wire import WireHeader


class FaultyLink:
    def __init__(self, inner: Link, drop: float = 0.0, delay: float = 0.0, delay_s: float = 0.0,
                 corrupt: float = 0.0, seed: int = 0):
        self.inner = inner
        self.drop, self.delay, self.delay_s, self.corrupt = drop, delay, delay_s, corrupt
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts = dict(dropped=0, delayed=0, corrupted=0)

    def send(self, address: Address, header: WireHeader, payload=None,
             timeout_s: float | None = None) -> None:
        with self._lock:
            drop, delay, corrupt = (self._rng.random() < p for p in (self.drop, self.delay,
                                                                      self.corrupt))
        if drop:
            self.counts["dropped"] += 1
            return
        if delay:
            self.counts["delayed"] += 1
            time.sleep(self.delay_s)
        if corrupt:
            self.counts["corrupted"] += 1
            token = bytes(b ^ 0x5A for b in header.fencing_token)
            header = dataclasses.replace(header, fencing_token=token)
        self.inner.send(address, header, payload, timeout_s)

    def close(self) -> None:
        self.inner.close()
