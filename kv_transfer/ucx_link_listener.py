"""LinkListener: receives messages from many LinkSenders over UCX (see ucx_link.py)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kv_transfer.ucx_link_common import (
    ACK_OK, ACK_REFUSED, FRAME_SIZE, Address, CloseFlag, LinkConfig, LinkError, LinkPeerLost,
    LinkRefused, LinkTimeout, byte_view, close_endpoint, describe, make_worker, pack_ack,
    progress_until, split_frame, ucx_api, ucx_array)
from kv_transfer.wire import MessageKind, WireError, WireHeader, unpack

log = logging.getLogger(__name__)

OnHeader = Callable[[WireHeader], Any]  # -> writable contiguous buffer, or None to refuse
OnPayload = Callable[[WireHeader, Any], None]
OnError = Callable[[LinkPeerLost], None]

_CANCEL_WAIT_S = 1.0  # a failed connection's requests finish cancelling well within this
_CLOSE_WAIT_S = 0.5


class _ConnFailed(Exception):
    pass


@dataclass
class _Conn:
    """One sender's connection and the message it is in the middle of."""

    id: int
    ep: Any
    closed: CloseFlag = field(
        default_factory=lambda: CloseFlag("sender died, reset or disconnected"))
    frame: np.ndarray = field(default_factory=lambda: np.zeros(FRAME_SIZE, dtype=np.uint8))
    frame_req: Any = None
    open_requests: set[str] = field(default_factory=set)  # LAYERs landed, no DONE/ABORT yet
    acks: list[tuple[Any, np.ndarray]] = field(default_factory=list)
    # The message in flight:
    header: WireHeader | None = None
    tag: int = 0
    target: Any = None  # what on_header returned; handed back to on_payload
    landing: np.ndarray | None = None  # byte view of target
    refusal: str | None = None
    payload_req: Any = None
    deadline: float = 0.0

    def requests(self) -> list[Any]:
        live = [self.frame_req, self.payload_req, *(r for r, _ in self.acks)]
        return [r for r in live if r is not None]


class LinkListener:
    """Accepts connections from many senders and lands each payload in a buffer
    chosen by `on_header`; everything runs on one thread this object owns.
    """

    def __init__(self, on_header: OnHeader, on_payload: OnPayload,
                 on_error: OnError | None = None, *, config: LinkConfig | None = None,
                 port: int = 0, start_timeout_s: float = 10.0) -> None:
        self.config = config or LinkConfig()
        self._on_header, self._on_payload, self._on_error = on_header, on_payload, on_error
        self._conns: dict[int, _Conn] = {}
        self._incoming: list[int] = []  # connection requests, accepted outside UCX's callback
        self._ids = itertools.count(1)
        self._discard = np.zeros(1, dtype=np.uint8)  # a refused payload is received into this
        self._ok_ack = pack_ack(ACK_OK)  # UCX only reads it: one buffer serves every ack
        self._orphans: list[tuple[list[Any], Any]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._port = 0
        # Frames that failed the wire checks (bad magic/version/CRC, truncated): each one
        # drops its connection and is counted here, never raised on the listener thread.
        self.garbage_frames = 0
        self._thread = threading.Thread(target=self._run, args=(port,), daemon=True,
                                        name="ucx-link-listener")
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            self._stop.set()
            raise LinkTimeout(f"UCX listener did not start within {start_timeout_s} s")
        if self._startup_error is not None:
            raise LinkError(f"UCX listener failed to start: {describe(self._startup_error)}") \
                from self._startup_error

    @property
    def address(self) -> Address:
        return (self.config.host, self._port)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_connections(self) -> int:
        return len(self._conns)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; open connections are closed (senders see an error)."""
        self._stop.set()
        if threading.current_thread() is self._thread:
            return  # called from a callback: the loop ends after it returns
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise LinkTimeout(f"UCX listener thread did not stop within {timeout_s} s")

    def __enter__(self) -> LinkListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Everything below runs on the listener thread.

    def _run(self, port: int) -> None:
        try:
            self._context, self._worker = make_worker(self.config)
            self._listener = ucx_api().UCXListener.create(
                worker=self._worker, port=port, cb_func=self._incoming.append)
            self._port = self._listener.port
        except BaseException as e:
            self._startup_error = e
            self._ready.set()
            return
        self._ready.set()
        poll_ms = max(1, int(self.config.poll_interval_s * 1000))
        try:
            while not self._stop.is_set():
                self._worker.progress_worker_event(poll_ms)
                self._accept()
                for conn in list(self._conns.values()):
                    self._step(conn)
        except BaseException as e:
            log.exception("UCX link listener thread crashed")
            for conn in list(self._conns.values()):  # the owner must not wait on these
                self._drop(conn, f"listener thread crashed: {describe(e)}")
            raise
        finally:
            self._shutdown()

    def _accept(self) -> None:
        while self._incoming:
            request = self._incoming.pop()
            try:
                ep = self._listener.create_endpoint_from_conn_request(request, True)
            except Exception as e:
                log.warning("rejected a connection: %s", describe(e))
                continue
            conn = _Conn(next(self._ids), ep)
            ep.set_close_callback(conn.closed)
            conn.frame_req = ep.stream_recv(ucx_array(conn.frame))
            self._conns[conn.id] = conn

    def _step(self, conn: _Conn) -> None:
        conn.acks = [(r, b) for r, b in conn.acks if not r.completed]
        try:
            if conn.closed.reason is not None:
                raise _ConnFailed(conn.closed.reason)
            if conn.header is None:
                self._read_frame(conn)
            if conn.header is not None:
                self._read_payload(conn)
        except _ConnFailed as e:
            self._drop(conn, str(e))
        except Exception as e:  # a UCX call failed: lose this connection, not the listener
            log.exception("connection %d failed", conn.id)
            self._drop(conn, f"unexpected error: {describe(e)}")

    def _read_frame(self, conn: _Conn) -> None:
        if not conn.frame_req.completed:
            return
        try:
            conn.frame_req.check_error()
            conn.tag, raw = split_frame(conn.frame)
            conn.header = unpack(raw)
        except WireError as e:  # the stream cannot be trusted any more
            self.garbage_frames += 1
            raise _ConnFailed(f"protocol error: {e}") from None
        except Exception as e:
            raise _ConnFailed(f"receiving a header: {describe(e)}") from None
        conn.deadline = time.monotonic() + self.config.message_timeout_s
        if conn.header.payload_nbytes:
            self._choose_buffer(conn, conn.header)

    def _choose_buffer(self, conn: _Conn, header: WireHeader) -> None:
        try:
            target = self._on_header(header)
        except LinkRefused as e:
            conn.refusal = str(e) or "refused"
            return
        except Exception as e:
            log.exception("on_header raised; refusing %r", header.request_id)
            conn.refusal = f"on_header raised {describe(e)}"
            return
        if target is None:
            conn.refusal = "refused by the receiver"
            return
        try:
            landing = byte_view(target, writable=True)
        except (TypeError, ValueError) as e:
            conn.refusal = f"receive buffer unusable: {e}"
            return
        if landing.nbytes != header.payload_nbytes:
            conn.refusal = (f"receive buffer is {landing.nbytes} bytes, "
                            f"message needs {header.payload_nbytes}")
            return
        conn.target, conn.landing = target, landing

    def _read_payload(self, conn: _Conn) -> None:
        header = conn.header
        assert header is not None
        now = time.monotonic()
        if header.payload_nbytes and conn.payload_req is None:
            probe = self._worker.tag_probe(ucx_api().UCXXTag(conn.tag), remove=True)
            if not probe.matched:
                self._check_deadline(conn, now, "payload to arrive")
                return
            if probe.length != header.payload_nbytes:
                conn.refusal = (f"payload is {probe.length} bytes, "
                                f"header says {header.payload_nbytes}")
            # A refused payload is still received (truncated into 1 byte) so the
            # sender's request completes and the stream stays in step.
            dest = conn.landing if conn.refusal is None else self._discard
            conn.payload_req = conn.ep.tag_recv_with_handle(ucx_array(dest), probe)
        if conn.payload_req is not None:
            if not conn.payload_req.completed:
                self._check_deadline(conn, now, "payload to land")
                return
            try:
                conn.payload_req.check_error()
            except ucx_api().UCXMessageTruncatedError:
                if conn.refusal is None:
                    raise _ConnFailed("payload larger than its buffer") from None
            except Exception as e:
                raise _ConnFailed(f"receiving payload: {describe(e)}") from None
        self._finish(conn, header)

    def _check_deadline(self, conn: _Conn, now: float, what: str) -> None:
        if now > conn.deadline:
            raise _ConnFailed(f"timed out after {self.config.message_timeout_s} s waiting "
                              f"for the {what}")

    def _finish(self, conn: _Conn, header: WireHeader) -> None:
        if conn.refusal is None:
            try:
                self._on_payload(header, conn.target)
            except LinkRefused as e:
                conn.refusal = str(e) or "refused"
            except Exception as e:
                log.exception("on_payload raised; refusing %r", header.request_id)
                conn.refusal = f"on_payload raised {describe(e)}"
        if header.kind is not MessageKind.LAYER:
            conn.open_requests.discard(header.request_id)
        elif conn.refusal is None:
            conn.open_requests.add(header.request_id)
        ack = self._ok_ack if conn.refusal is None else pack_ack(ACK_REFUSED, conn.refusal)
        conn.acks.append((conn.ep.stream_send(ucx_array(ack)), ack))
        conn.header = conn.target = conn.landing = conn.refusal = conn.payload_req = None
        conn.frame_req = conn.ep.stream_recv(ucx_array(conn.frame))

    def _drop(self, conn: _Conn, reason: str) -> None:
        self._conns.pop(conn.id, None)
        close_endpoint(conn.ep, f"connection {conn.id}")
        # UCX may write into the landing buffer until the receive completes
        # (cancelled): wait for that before telling the owner it may reuse it.
        requests = conn.requests()
        progress_until(self._worker, lambda: all(r.completed for r in requests),
                       time.monotonic() + _CANCEL_WAIT_S, 0.01)
        if not all(r.completed for r in requests):
            log.warning("connection %d: requests still pending after close", conn.id)
            self._orphans.append((requests, conn.landing))
        self._orphans = [(r, b) for r, b in self._orphans if not all(x.completed for x in r)]
        affected = set(conn.open_requests)
        if conn.header is not None:
            affected.add(conn.header.request_id)
        log.info("connection %d dropped: %s", conn.id, reason)
        if affected and self._on_error is not None:
            error = LinkPeerLost(f"connection {conn.id} lost: {reason}", peer=conn.id,
                                 header=conn.header, request_ids=frozenset(affected))
            try:
                self._on_error(error)
            except Exception:
                log.exception("on_error raised")

    def _shutdown(self) -> None:
        for conn in list(self._conns.values()):
            close_endpoint(conn.ep, f"connection {conn.id}")
        # Senders that are alive answer the close handshake at once; a silent
        # one is not waited for (it cannot be writing into a buffer either).
        requests = [r for conn in self._conns.values() for r in conn.requests()]
        progress_until(self._worker, lambda: all(r.completed for r in requests),
                       time.monotonic() + _CLOSE_WAIT_S, 0.01)
        self._conns.clear()
        # Drop UCX objects on this thread, endpoints before listener before worker.
        self._listener = None
        self._worker = None
        self._context = None
