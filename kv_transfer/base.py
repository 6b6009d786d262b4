"""The KV handoff's shared vocabulary: transfer states, the lease, the link interface.

Split by role, as in the lifecycle of one request:

    decode side (KVReceiver)                     prefill side (KVSender)
    reserve(rid, n) -> Lease  ---- router ---->  open(lease)
      RESERVED                                   engine computes layer 0..L-1
      TRANSFERRING  <--- LAYER l, tokens [a,b) - sink(...) per layer (a thread sends)
      READY         <--- DONE(first token) ----- finish(first_token)
    take(rid) -> blocks, first token (the engine owns them now)

Any failure ends in FAILED or EXPIRED with the reserved blocks back in the pool:
the lease's expiry passes, a message carries a stale fencing token or another
model's fingerprint, the sender aborts or dies (the link reports the lost
connection), or either side cancels.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from kv_transfer.wire import WireHeader

Address = tuple[str, int]


class TransferState(enum.IntEnum):
    """Ordered: a live transfer only moves forward; FAILED and EXPIRED are terminal."""

    RESERVED = 1
    TRANSFERRING = 2
    READY = 3
    FAILED = 4
    EXPIRED = 5

    @property
    def terminal(self) -> bool:
        return self >= TransferState.FAILED


class TransferError(RuntimeError):
    """A transfer failed; the message says which request and why."""


@dataclass(frozen=True)
class Lease:
    """The decode side's promise: these blocks wait for this request's KV until expires_at."""

    request_id: str
    block_ids: tuple[int, ...]
    address: Address  # where the receiver's link listens
    fencing_token: bytes  # random per lease; messages without it are refused
    expires_at: float  # time.time() seconds
    num_tokens: int
    model_fingerprint: str


class Link(Protocol):
    """Sends one message and returns when the receiver has taken it (see ucx_link.py)."""

    def send(self, address: Address, header: WireHeader, payload: Any = None,
             timeout_s: float | None = None) -> None: ...

    def close(self) -> None: ...


class Listener(Protocol):
    @property
    def address(self) -> Address: ...

    def close(self, timeout_s: float = 5.0) -> None: ...
