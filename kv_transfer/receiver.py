"""Decode side of the KV handoff: leases, landing layers in reserved blocks, reclaiming.

Threads: `reserve`, `take`, `cancel`, `state`, `wait` are called by the decode
worker; `_on_header`/`_on_payload`/`_on_error` by the link's listener thread;
`expire` by the reaper thread this object owns. One lock guards the records, and
a block is written only while its lease is live under that lock, so a late or
stale message can never write into a block that was freed and handed out again.
"""
from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kv_transfer.base import Address, Lease, Listener, TransferState
from kv_transfer.ucx_link_common import LinkPeerLost, LinkRefused
from kv_transfer.wire import MessageKind, WireHeader, new_fencing_token


class BlockStore(Protocol):
    """The decode engine's KV pool as the receiver sees it; each call is thread-safe."""

    def allocate(self, num_tokens: int) -> list[int]: ...  # raises when there is no room

    def free(self, block_ids: list[int]) -> None: ...

    def write(self, layer: int, block_ids: list[int], start: int, kv: torch.Tensor) -> None: ...


@dataclass
class TransferStats:
    bytes_received: int = 0
    layers_received: int = 0
    leases_granted: int = 0
    leases_expired: int = 0
    transfers_ready: int = 0
    transfers_failed: int = 0
    messages_refused: int = 0
    seconds: list[float] = field(default_factory=list)  # reserve -> READY, per request (recent)


@dataclass
class _Record:
    lease: Lease
    num_layers: int
    state: TransferState = TransferState.RESERVED
    received: list[int] = field(default_factory=list)  # per layer: tokens landed so far
    first_token: int | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    expires_at: float = 0.0  # the lease's expiry, pushed out as layers land
    ttl_s: float = 0.0


ListenerFactory = Callable[..., Listener]


class KVReceiver:
    def __init__(self, store: BlockStore, listener_factory: ListenerFactory, *,
                 model_fingerprint: str, num_layers: int, kv_heads: int, head_dim: int,
                 lease_ttl_s: float = 30.0, reap_interval_s: float = 0.05,
                 staging_device: torch.device | str = "cpu"):
        self.store = store
        self.fingerprint = model_fingerprint
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.lease_ttl_s = lease_ttl_s
        self.staging_device = torch.device(staging_device)  # where the link lands payloads
        self.stats = TransferStats()
        self._records: dict[str, _Record] = {}
        self._finished: dict[str, _Record] = {}  # terminal records, kept for state() queries
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.listener = listener_factory(self._on_header, self._on_payload, self._on_error)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, args=(reap_interval_s,),
                                        daemon=True, name="kv-lease-reaper")
        self._reaper.start()

    @property
    def address(self) -> Address:
        return self.listener.address

    # -- the decode worker's side ------------------------------------------------

    def reserve(self, request_id: str, num_tokens: int, ttl_s: float | None = None) -> Lease:
        blocks = self.store.allocate(num_tokens)
        lease = Lease(request_id, tuple(blocks), self.address, new_fencing_token(),
                      time.time() + (ttl_s or self.lease_ttl_s), num_tokens, self.fingerprint)
        with self._lock:
            if request_id in self._records:
                self.store.free(blocks)
                raise ValueError(f"request {request_id!r} already holds a lease")
            self._finished.pop(request_id, None)
            self._records[request_id] = _Record(
                lease, self.num_layers, received=[0] * self.num_layers,
                expires_at=lease.expires_at, ttl_s=ttl_s or self.lease_ttl_s)
            self.stats.leases_granted += 1
        return lease

    def state(self, request_id: str) -> TransferState | None:
        with self._lock:
            rec = self._records.get(request_id) or self._finished.get(request_id)
            return rec.state if rec else None

    def error(self, request_id: str) -> str | None:
        with self._lock:
            rec = self._records.get(request_id) or self._finished.get(request_id)
            return rec.error if rec else None

    def wait(self, request_id: str, timeout_s: float) -> TransferState | None:
        """Blocks until the transfer is READY or terminal, or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                rec = self._records.get(request_id) or self._finished.get(request_id)
                if rec is None or rec.state >= TransferState.READY:
                    return rec.state if rec else None
                left = deadline - time.monotonic()
                if left <= 0:
                    return rec.state
                self._changed.wait(left)

    def take(self, request_id: str) -> tuple[list[int], int]:
        """Hands a READY request's blocks and first token to the caller (the engine)."""
        with self._lock:
            rec = self._records.get(request_id)
            if rec is None or rec.state != TransferState.READY:
                state = rec.state.name if rec else "unknown"
                raise ValueError(f"request {request_id!r} is {state}, not READY")
            del self._records[request_id]
            return list(rec.lease.block_ids), rec.first_token

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Frees the request's reserved blocks now; False if it held none."""
        with self._lock:
            return self._end(request_id, TransferState.FAILED, reason)

    def expire(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self._lock:
            # READY but never taken expires too: nothing may hold blocks past its lease.
            late = [rid for rid, rec in self._records.items() if rec.expires_at <= now]
            for rid in late:
                self._end(rid, TransferState.EXPIRED, "the lease expired before the KV arrived")
            return late

    @property
    def num_pending(self) -> int:
        with self._lock:
            return sum(rec.state < TransferState.READY for rec in self._records.values())

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            for rid in list(self._records):
                self._end(rid, TransferState.FAILED, "the receiver closed")
        self._reaper.join(timeout=2)

    # -- the listener thread's side ------------------------------------------

    def _check(self, header: WireHeader) -> _Record:
        """The record the message may write into, or LinkRefused; caller holds the lock."""
        rec = self._records.get(header.request_id)
        if rec is None or rec.state.terminal:
            raise LinkRefused(f"no live lease for request {header.request_id!r}")
        if not hmac.compare_digest(header.fencing_token, rec.lease.fencing_token):
            raise LinkRefused(f"stale or wrong fencing token for {header.request_id!r}")
        if rec.state == TransferState.READY:
            raise LinkRefused(f"request {header.request_id!r} is already READY")
        if header.model_fingerprint != self.fingerprint:
            self._end(header.request_id, TransferState.FAILED,
                      f"model fingerprint {header.model_fingerprint!r} != {self.fingerprint!r}")
            raise LinkRefused(f"model fingerprint mismatch: sender {header.model_fingerprint!r}, "
                              f"receiver {self.fingerprint!r}")
        if rec.expires_at <= time.time():
            self._end(header.request_id, TransferState.EXPIRED, "the lease expired")
            raise LinkRefused(f"the lease for {header.request_id!r} expired")
        return rec

    def _refuse_layer(self, rec: _Record, header: WireHeader) -> str | None:
        if header.layer >= self.num_layers:
            return f"layer {header.layer} out of range (model has {self.num_layers})"
        if tuple(header.shape[2:]) != (self.kv_heads, self.head_dim):
            return (f"KV shape {header.shape} does not fit [2, n, {self.kv_heads}, "
                    f"{self.head_dim}]")
        if header.token_end > rec.lease.num_tokens:
            return f"tokens up to {header.token_end} exceed the lease's {rec.lease.num_tokens}"
        if header.token_start != rec.received[header.layer]:
            return (f"layer {header.layer} tokens start at {header.token_start}, "
                    f"expected {rec.received[header.layer]}")
        return None

    def _on_header(self, header: WireHeader) -> torch.Tensor:
        with self._lock:
            try:
                rec = self._check(header)
            except LinkRefused:
                self.stats.messages_refused += 1
                raise
            problem = self._refuse_layer(rec, header)
            if problem:
                self._end(header.request_id, TransferState.FAILED, problem)
                self.stats.messages_refused += 1
                raise LinkRefused(problem)
            rec.state = TransferState.TRANSFERRING
        # staging, then scattered into the blocks (block sizes may differ between the sides)
        return torch.empty(header.shape, dtype=header.dtype.torch, device=self.staging_device)

    def _on_payload(self, header: WireHeader, buffer: torch.Tensor | None) -> None:
        with self._lock:
            try:
                rec = self._check(header)
            except LinkRefused:
                self.stats.messages_refused += 1
                raise
            rid = header.request_id
            if header.kind is MessageKind.ABORT:
                self._end(rid, TransferState.FAILED, "the sender aborted")
            elif header.kind is MessageKind.DONE:
                missing = [layer for layer, n in enumerate(rec.received)
                           if n != rec.lease.num_tokens]
                if missing:
                    self._end(rid, TransferState.FAILED, f"DONE with layers {missing} incomplete")
                    raise LinkRefused(f"DONE before layers {missing} were complete")
                rec.state, rec.first_token = TransferState.READY, header.first_token
                self.stats.transfers_ready += 1
                self.stats.seconds = self.stats.seconds[-999:] + [time.monotonic() - rec.started]
                self._changed.notify_all()
            else:
                # Written under the lock: the lease cannot end (and its blocks be reused) meanwhile.
                self.store.write(header.layer, list(rec.lease.block_ids), header.token_start, buffer)
                rec.received[header.layer] = header.token_end
                # Progress keeps a lease alive: a long chunked prefill may outlast one TTL,
                # a sender that stops sending may not.
                rec.expires_at = max(rec.expires_at, time.time() + rec.ttl_s)
                self.stats.bytes_received += header.payload_nbytes
                self.stats.layers_received += 1

    def _on_error(self, exc: LinkPeerLost) -> None:
        with self._lock:
            for rid in exc.request_ids:
                self._end(rid, TransferState.FAILED, f"the sender's connection was lost: {exc}")

    # -- ending ---------------------------------------------------------------

    def _end(self, request_id: str, state: TransferState, reason: str) -> bool:
        """Terminal state, blocks back to the pool; caller holds the lock."""
        rec = self._records.get(request_id)
        if rec is None:
            return False
        del self._records[request_id]
        rec.state, rec.error = state, reason
        self._finished[request_id] = rec
        while len(self._finished) > 10_000:  # bounded memory for state() queries
            self._finished.pop(next(iter(self._finished)))
        self.store.free(list(rec.lease.block_ids))
        if state == TransferState.EXPIRED:
            self.stats.leases_expired += 1
        else:
            self.stats.transfers_failed += 1
        self._changed.notify_all()
        return True

    def _reap(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.expire()
