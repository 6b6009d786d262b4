"""LinkSender: pushes messages to LinkListeners over UCX (see ucx_link.py)."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kv_transfer.ucx_link_common import (
    ACK_OK, ACK_SIZE, Address, CloseFlag, LinkConfig, LinkError, LinkPeerLost, LinkRefused,
    LinkTimeout, byte_view, close_endpoint, describe, make_worker, pack_frame, progress_until,
    ucx_api, ucx_array, unpack_ack)
from kv_transfer.wire import DType, MessageKind, WireError, WireHeader, pack

log = logging.getLogger(__name__)

# How long a failed endpoint's requests may take to finish cancelling before
# we stop waiting for them (they stay referenced until they do).
_CANCEL_WAIT_S = 1.0
_CLOSE_WAIT_S = 0.5  # graceful close handshake; a silent peer is not waited for longer


@dataclass
class _Peer:
    address: Address
    ep: Any
    closed: CloseFlag = field(default_factory=lambda: CloseFlag("receiver died or reset"))


@dataclass
class _Orphans:
    """Requests abandoned by a failed send and the buffers they point into.

    UCX may touch a buffer until its request completes, so the buffer stays
    referenced here until then rather than being handed back too early.
    """

    pending: list[tuple[list[Any], list[np.ndarray]]] = field(default_factory=list)

    def add(self, requests: list[Any], buffers: list[np.ndarray]) -> None:
        self.pending.append((requests, buffers))

    def reap(self) -> bool:
        """Forget what completed; True when nothing is left."""
        self.pending = [(r, b) for r, b in self.pending if not all(x.completed for x in r)]
        return not self.pending


class LinkSender:
    """Sends messages to listeners; one UCX worker, one cached endpoint per address.

    Thread-safe: send() calls are serialised by a lock and the UCX worker is
    progressed only inside them, by the calling thread (no background thread,
    so an idle sender costs nothing). A dead peer is noticed on the next send.
    """

    def __init__(self, config: LinkConfig | None = None) -> None:
        self.config = config or LinkConfig()
        self._lock = threading.Lock()
        self._context, self._worker = make_worker(self.config)
        self._peers: dict[Address, _Peer] = {}
        self._orphans = _Orphans()
        self._rng = random.Random()
        self._closed = False

    def send(self, address: Address, header: WireHeader,
             payload: torch.Tensor | np.ndarray | None = None,
             timeout_s: float | None = None) -> None:
        """Deliver one message and wait until the receiver has taken it.

        Returns once the receiver's on_payload returned. Raises LinkRefused if
        the receiver refused it, LinkPeerLost if the connection failed (the
        endpoint is dropped; the next send reconnects), LinkTimeout past
        `timeout_s` (default config.send_timeout_s), WireError/TypeError if the
        payload does not match the header. The payload may be reused as soon as
        send returns or raises.
        """
        address = (str(address[0]), int(address[1]))
        data = self._check_payload(header, payload)
        frame = pack_frame(self._rng.getrandbits(64), pack(header))
        timeout_s = self.config.send_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                raise LinkError("LinkSender is closed")
            self._orphans.reap()
            peer = self._peer(address)
            api = ucx_api()
            ack = np.zeros(ACK_SIZE, dtype=np.uint8)
            buffers = [ack, frame]
            # Post the ack receive first so the reply never waits unexpected.
            requests = [peer.ep.stream_recv(ucx_array(ack)),
                        peer.ep.stream_send(ucx_array(frame))]
            if data is not None:
                tag = int.from_bytes(frame[:8].tobytes(), "little")
                requests.append(peer.ep.tag_send(ucx_array(data), api.UCXXTag(tag)))
                buffers.append(data)
            done = progress_until(
                self._worker,
                lambda: peer.closed.reason is not None or all(r.completed for r in requests),
                deadline, self.config.poll_interval_s)
            error = self._first_error(requests) if done else None
            if not done or error or peer.closed.reason:
                self._drop(peer, requests, buffers)
                where = (f"{header.kind.name} {header.request_id!r} layer {header.layer} "
                         f"to {address}")
                if not done:
                    raise LinkTimeout(f"send of {where} timed out after {timeout_s:.1f} s")
                cause = "; ".join(filter(None, [peer.closed.reason, error]))
                raise LinkPeerLost(f"send of {where} failed: {cause}",
                                   header=header, request_ids=frozenset({header.request_id}))
        status, reason = unpack_ack(ack)
        if status != ACK_OK:
            raise LinkRefused(f"receiver at {address} refused {header.kind.name} "
                              f"{header.request_id!r} layer {header.layer}: {reason}")

    def disconnect(self, address: Address) -> None:
        """Close the cached endpoint to `address`, if any."""
        with self._lock:
            peer = self._peers.pop(address, None)
            if peer is not None:
                self._close_gracefully([peer])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_gracefully(list(self._peers.values()))
            self._peers.clear()
            progress_until(self._worker, self._orphans.reap,
                           time.monotonic() + _CANCEL_WAIT_S, 0.01)

    def __enter__(self) -> LinkSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_payload(header: WireHeader, payload: object) -> np.ndarray | None:
        if header.kind is not MessageKind.LAYER:
            if payload is not None:
                raise WireError(f"{header.kind.name} carries no payload")
            return None
        if payload is None:
            raise WireError("LAYER needs a payload")
        if isinstance(payload, torch.Tensor) and (
                tuple(payload.shape) != header.shape
                or DType.from_torch(payload.dtype) != header.dtype):
            raise WireError(f"payload {tuple(payload.shape)} {payload.dtype} does not match "
                            f"header {header.shape} {header.dtype.name}")
        data = byte_view(payload, writable=False)
        if data.nbytes != header.payload_nbytes:
            raise WireError(f"payload is {data.nbytes} bytes, "
                            f"header says {header.payload_nbytes}")
        return data

    def _peer(self, address: Address) -> _Peer:
        peer = self._peers.get(address)
        if peer is not None:
            return peer
        host, port = address
        try:
            ep = ucx_api().UCXEndpoint.create(self._worker, host, int(port), True)
        except Exception as e:  # UCX raises its own types; callers see one
            raise LinkPeerLost(f"cannot connect to {address}: {describe(e)}") from e
        peer = _Peer(address, ep)
        ep.set_close_callback(peer.closed)
        self._peers[address] = peer
        return peer

    @staticmethod
    def _first_error(requests: list[Any]) -> str | None:
        """The most telling error among completed requests.

        A cancelled stream receive reports a length mismatch, which hides the
        reset that caused it; prefer any other error.
        """
        errors = []
        for request in requests:
            if request.completed:
                try:
                    request.check_error()
                except Exception as e:
                    errors.append(e)
        errors.sort(key=lambda e: isinstance(e, ucx_api().UCXMessageTruncatedError))
        return describe(errors[0]) if errors else None

    def _drop(self, peer: _Peer, requests: list[Any], buffers: list[np.ndarray]) -> None:
        self._peers.pop(peer.address, None)
        close_endpoint(peer.ep, f"endpoint to {peer.address}")
        deadline = time.monotonic() + _CANCEL_WAIT_S
        progress_until(self._worker, lambda: all(r.completed for r in requests), deadline, 0.01)
        if not all(r.completed for r in requests):
            log.warning("requests to %s still pending after close; keeping their buffers",
                        peer.address)
            self._orphans.add(requests, buffers)

    def _close_gracefully(self, peers: list[_Peer]) -> None:
        """Close endpoints and progress until the receivers have been told.

        A UCX close is a handshake: without progress here the receiver would
        only notice when this process exits.
        """
        for peer in peers:
            close_endpoint(peer.ep, f"endpoint to {peer.address}")
        progress_until(self._worker, lambda: not any(p.ep.alive for p in peers),
                       time.monotonic() + _CLOSE_WAIT_S, 0.01)
