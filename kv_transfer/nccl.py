"""NCCL link for GPU pairs: control frames over TCP, KV payloads by NCCL send/recv.

Same contract as the UCX link (see ucx_link.py): `NcclLink.send` delivers one
message and returns once the receiver acked it; the listener calls on_header to
get a (GPU) buffer, receives the payload into it, then calls on_payload.

Per connection the two ends form a private 2-rank NCCL process group (sender rank
0, receiver rank 1) over a TCPStore the listener hosts, so many prefill workers can
feed one decode worker. Only used when both sides have CUDA and the spec names
`nccl`; on a CPU-only machine importing this module works, and constructing either
end raises a clear error.
"""
from __future__ import annotations

import socket
import struct
import threading
from datetime import timedelta

import torch

from kv_transfer.base import Address
from kv_transfer.ucx_link_common import LinkPeerLost, LinkRefused
from kv_transfer.wire import HEADER_SIZE, WireError, WireHeader, pack, unpack

_ACK = struct.Struct("<B255s")
_HELLO = struct.Struct("<I")  # the TCPStore port the receiver opened for this connection


def require_cuda() -> None:
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        raise RuntimeError("transport.kind: nccl needs CUDA and NCCL on both workers; "
                           "use ucx on machines without GPUs")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _group(host: str, port: int, rank: int, is_master: bool):
    store = torch.distributed.TCPStore(host, port, 2, is_master, timeout=timedelta(seconds=30))
    return torch.distributed.ProcessGroupNCCL(store, rank, 2)


class NcclListener:
    def __init__(self, on_header, on_payload, on_error=None, *, host: str = "127.0.0.1"):
        require_cuda()
        self.on_header, self.on_payload, self.on_error = on_header, on_payload, on_error
        self._lock = threading.Lock()  # callbacks one at a time, as with the UCX listener
        self._server = socket.create_server((host, 0))
        self._address = (host, self._server.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="nccl-listener").start()

    @property
    def address(self) -> Address:
        return self._address

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        open_requests: set[str] = set()
        try:
            store = socket.create_server((self._address[0], 0))
            port = store.getsockname()[1]
            store.close()  # TCPStore binds it next; a race here only fails this connection
            conn.sendall(_HELLO.pack(port))
            group = _group(self._address[0], port, 1, True)
            while True:
                header = unpack(_recv_exact(conn, HEADER_SIZE))
                reason = ""
                with self._lock:
                    try:
                        target = self.on_header(header) if header.payload_nbytes else None
                        if header.payload_nbytes:
                            group.recv([target], 0, 0).wait()
                        self.on_payload(header, target)
                        (open_requests.add if header.payload_nbytes else open_requests.discard)(
                            header.request_id)
                    except LinkRefused as exc:
                        reason = str(exc) or "refused"
                conn.sendall(_ACK.pack(1 if reason else 0, reason.encode()[:255]))
        except (ConnectionError, OSError, WireError, RuntimeError) as exc:
            if self.on_error is not None and open_requests:
                self.on_error(LinkPeerLost(f"NCCL link connection lost: {exc}",
                                           request_ids=frozenset(open_requests)))
        finally:
            conn.close()


class NcclLink:
    def __init__(self):
        require_cuda()
        self._lock = threading.Lock()
        self._peers: dict[Address, tuple[socket.socket, object]] = {}

    def _peer(self, address: Address):
        if address not in self._peers:
            sock = socket.create_connection(address, timeout=30)
            (port,) = _HELLO.unpack(_recv_exact(sock, _HELLO.size))
            self._peers[address] = (sock, _group(address[0], port, 0, False))
        return self._peers[address]

    def send(self, address: Address, header: WireHeader, payload=None,
             timeout_s: float | None = None) -> None:
        with self._lock:
            try:
                sock, group = self._peer(tuple(address))
                sock.settimeout(timeout_s or 30)
                sock.sendall(pack(header))
                if header.payload_nbytes:
                    group.send([payload.contiguous()], 1, 0).wait()
                status, reason = _ACK.unpack(_recv_exact(sock, _ACK.size))
            except (ConnectionError, OSError, RuntimeError) as exc:
                self._peers.pop(tuple(address), None)
                raise LinkPeerLost(f"NCCL send to {address} failed: {exc}",
                                   request_ids=frozenset({header.request_id})) from exc
        if status:
            raise LinkRefused(reason.rstrip(b"\0").decode(errors="replace"))

    def close(self) -> None:
        with self._lock:
            for sock, _ in self._peers.values():
                sock.close()
            self._peers.clear()


def nccl_listener_factory(host: str):
    require_cuda()
    return lambda h, p, e: NcclListener(h, p, e, host=host)
