"""Prefill side of the KV handoff: push each layer as it is computed, then DONE.

The engine's per-layer sink only enqueues; one sender thread moves the bytes, in
order, so sending layer l overlaps computing layer l + 1. A failed send fails the
whole transfer: its later messages are dropped, an ABORT is attempted so the
receiver frees the lease at once (it would expire anyway), and `wait` raises.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from kv_transfer.base import Lease, Link, TransferError
from kv_transfer.wire import MessageKind, WireHeader


@dataclass
class SenderStats:
    bytes_sent: int = 0
    layers_sent: int = 0
    transfers_done: int = 0
    transfers_failed: int = 0
    send_seconds: float = 0.0  # time spent inside link.send


class Transfer:
    """One request's outgoing KV."""

    def __init__(self, sender: KVSender, lease: Lease):
        self.sender = sender
        self.lease = lease
        self.error: str | None = None
        self.bytes_sent = 0
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._done = threading.Event()
        self._callbacks: list = []
        self._callback_lock = threading.Lock()

    def sink(self, request_id: str, layer: int, start: int, end: int, kv: torch.Tensor) -> None:
        """The engine's KVSink: queue one layer's K/V [2, end - start, kv_heads, head_dim]."""
        if self.error is None:
            header = WireHeader.for_layer(self.lease.request_id, self.lease.fencing_token,
                                          self.lease.model_fingerprint, layer, start, kv)
            self.sender._queue.put((self, header, kv.contiguous()))

    def finish(self, first_token: int) -> None:
        """All layers are queued; DONE carries the first sampled token."""
        self.sender._queue.put((self, self._control(MessageKind.DONE, first_token), None))

    def abort(self, reason: str) -> None:
        if self.error is None:
            self.fail(reason)
            self.sender._queue.put((self, self._control(MessageKind.ABORT), None))

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            self.sender.stats.transfers_failed += 1
        self._complete()

    def add_done_callback(self, fn) -> None:
        """`fn(transfer)` once DONE was delivered or the transfer failed (at once if already so)."""
        with self._callback_lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _complete(self) -> None:
        with self._callback_lock:
            if self._done.is_set():
                return
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def wait(self, timeout_s: float) -> None:
        """Returns once DONE was delivered; raises TransferError on failure or timeout."""
        if not self._done.wait(timeout_s):
            self.abort(f"the transfer did not finish within {timeout_s:.1f} s")
        if self.error is not None:
            raise TransferError(f"KV transfer of {self.lease.request_id!r} failed: {self.error}")

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _control(self, kind: MessageKind, first_token: int = -1) -> WireHeader:
        return WireHeader(kind, self.lease.request_id, self.lease.fencing_token,
                          self.lease.model_fingerprint, first_token=first_token)


class KVSender:
    def __init__(self, link: Link, send_timeout_s: float = 30.0):
        self.link = link
        self.send_timeout_s = send_timeout_s
        self.stats = SenderStats()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kv-sender")
        self._thread.start()

    def open(self, lease: Lease) -> Transfer:
        return Transfer(self, lease)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        self.link.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            transfer, header, payload = item
            if transfer.error is not None and header.kind is not MessageKind.ABORT:
                continue  # a failed transfer sends nothing more but its ABORT
            start = time.monotonic()
            try:
                self.link.send(transfer.lease.address, header, payload, self.send_timeout_s)
            except Exception as exc:  # noqa: BLE001 - any link failure fails this transfer only
                if header.kind is not MessageKind.ABORT:
                    transfer.fail(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                self.stats.send_seconds += time.monotonic() - start
            if header.kind is MessageKind.LAYER:
                transfer.bytes_sent += header.payload_nbytes
                self.stats.bytes_sent += header.payload_nbytes
                self.stats.layers_sent += 1
            elif header.kind is MessageKind.DONE:
                transfer.finished_at = time.monotonic()
                self.stats.transfers_done += 1
                transfer._complete()
