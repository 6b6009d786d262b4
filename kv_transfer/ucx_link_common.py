"""What the UCX link's two ends share: config, errors, frames, buffers, waits.

Every UCX object here is used by one thread at a time (UCX workers are created
single-threaded); see ucx_link.py for which thread that is on each side.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from kv_transfer.wire import HEADER_SIZE, WireHeader

log = logging.getLogger(__name__)

# ucxx warns about every UCX_* variable its context does not read; harmless noise.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
# Importing ucxx writes UCX_RNDV_THRESH=8192 into os.environ unless it is set;
# remember what was there before, so our defaults yield to the user only.
_ENV_BEFORE_UCXX = frozenset(k for k in os.environ if k.startswith("UCX_"))
_SET_BY_UCXX = frozenset({"UCX_RNDV_THRESH"})


def _user_set(name: str) -> bool:
    return name in (_ENV_BEFORE_UCXX if name in _SET_BY_UCXX else os.environ)


Address = tuple[str, int]

# Control frame, sender -> receiver over the endpoint's UCX stream (ordered per
# connection): the tag the payload will be sent with, then the wire header.
_TAG = struct.Struct("<Q")
FRAME_SIZE = _TAG.size + HEADER_SIZE

# Ack frame, receiver -> sender over the same stream, one per message.
_ACK = struct.Struct("<BH253s")
ACK_SIZE = _ACK.size
ACK_OK, ACK_REFUSED = 0, 1


class LinkError(Exception):
    """The link could not deliver a message (dead peer, timeout, protocol error)."""


class LinkTimeout(LinkError):
    """A wait on the link ran past its deadline."""


class LinkRefused(LinkError):
    """The receiver would not take a message.

    Raised by a receiver callback to refuse; raised by `LinkSender.send` when the
    receiver refused (the reason travels back in the ack).
    """


class LinkPeerLost(LinkError):
    """A connection failed; on the receiver it names what was in flight on it.

    `request_ids`: requests that had messages on this connection and no DONE or
    ABORT yet (plus the one in flight), so the owner can fail them at once.
    """

    def __init__(self, message: str, *, peer: int = -1, header: WireHeader | None = None,
                 request_ids: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.peer = peer
        self.header = header
        self.request_ids = request_ids


@dataclass(frozen=True)
class LinkConfig:
    """How one end of the link sets up UCX, and its timeouts.

    The options up to `ucx_options` are defaults measured on loopback (see
    benchmarks/transfer_link_bench.py); a user's UCX_* environment variable of
    the same name wins over them. `ucx_options` always applies.
    """

    net_devices: str | None = "lo"  # UCX_NET_DEVICES; None lets UCX use every device
    # UCX_TCP_{TX,RX}_SEG_SIZE: the 8 KiB default costs a syscall and a copy
    # per 8 KiB; 1 MiB segments roughly double large-message throughput.
    tcp_segment_size: str | None = "1m"
    # UCX_RNDV_SCHEME: put_zcopy sends large payloads over tcp straight from
    # the sender's tensor instead of staging them through fragment buffers
    # (set None with shared_memory, whose own pipeline is faster).
    rndv_scheme: str | None = "put_zcopy"
    # UCX_RNDV_THRESH: payloads below it go eagerly, in one trip, instead of
    # the rendezvous handshake's three. Larger ones wait for the receiver's
    # buffer, so a refused large payload is never moved.
    rndv_threshold: str | None = "256kb"
    # Same-host peers over shared memory (MM_ERROR_HANDLING=y): 2-4x the socket
    # on an idle host, but NOT failure-safe: a sender killed while writing
    # into the receiver's shared FIFO wedges that receiver for every sender
    # (reproduced within 1-10 kill -9 cycles). Off unless peers never die
    # mid-transfer or the receiver can be restarted.
    shared_memory: bool = False
    # UCX_MM_FIFO_SIZE when shared_memory: entries (~8 KiB each) per receive
    # FIFO. UCX's 64 is fastest idle (6-8 GB/s) but stalls whenever the
    # receiver is descheduled; 4096 (~32 MiB) keeps >= the socket under load.
    shm_fifo_entries: int | None = 4096
    ucx_options: tuple[tuple[str, str], ...] = field(default=())  # e.g. (("TLS", "tcp"),)
    # The address the listener reports. UCX binds its listener on every
    # interface (ucxx exposes no bind address); NET_DEVICES limits the data path.
    host: str = "127.0.0.1"
    send_timeout_s: float = 30.0  # one send(): frame + payload + ack
    message_timeout_s: float = 30.0  # receiver: frame arrived -> payload landed
    poll_interval_s: float = 0.05  # longest a progress wait sleeps before checking flags

    def __post_init__(self) -> None:
        for name in ("send_timeout_s", "message_timeout_s", "poll_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkConfig.{name} must be > 0, got {getattr(self, name)}")

    def resolved_ucx_options(self) -> dict[str, str]:
        defaults: dict[str, str] = {}
        if self.net_devices:
            defaults["NET_DEVICES"] = self.net_devices
        if self.tcp_segment_size:
            defaults["TCP_TX_SEG_SIZE"] = defaults["TCP_RX_SEG_SIZE"] = self.tcp_segment_size
        if self.rndv_scheme:
            defaults["RNDV_SCHEME"] = self.rndv_scheme
        if self.rndv_threshold:
            defaults["RNDV_THRESH"] = self.rndv_threshold
        # UCX already leaves shared memory out of error-handling endpoints;
        # saying so keeps it out should that default ever change.
        defaults["MM_ERROR_HANDLING"] = "y" if self.shared_memory else "n"
        if self.shared_memory and self.shm_fifo_entries:
            defaults["MM_FIFO_SIZE"] = str(self.shm_fifo_entries)
        options = {k: v for k, v in defaults.items() if not _user_set(f"UCX_{k}")}
        options.update(self.ucx_options)
        return options


class CloseFlag:
    """UCX's close callback for one endpoint: records why it closed.

    Kept apart from the object owning the endpoint so that the callback, which
    the endpoint holds, does not reference the endpoint back.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.reason: str | None = None

    def __call__(self) -> None:
        if self.reason is None:
            self.reason = f"connection closed ({self.what})"


def close_endpoint(ep: Any, what: str) -> None:
    """Closes a UCX endpoint if it is still alive. Only a live endpoint is closed: touching
    one UCX already closed (remove_close_callback in particular) can crash the process."""
    try:
        if ep.alive:
            ep.close()
    except Exception as e:
        log.debug("closing %s: %s", what, describe(e))


def ucx_api() -> Any:
    """The blocking UCXX API, imported on first use (the import costs ~0.5 s)."""
    import ucxx._lib.libucxx as api

    return api


def make_worker(config: LinkConfig) -> tuple[Any, Any]:
    api = ucx_api()
    context = api.UCXContext(
        config_dict=config.resolved_ucx_options(),
        feature_flags=(api.Feature.TAG, api.Feature.STREAM, api.Feature.WAKEUP))
    worker = api.UCXWorker(context)
    # Blocking mode: progress_worker_event sleeps in epoll (GIL released) until
    # UCX has work, instead of spinning a core.
    worker.init_blocking_progress_mode()
    return context, worker


def ucx_array(arr: np.ndarray) -> Any:
    from ucxx._lib.arr import Array

    return Array(arr)


def progress_until(worker: Any, done: Callable[[], bool], deadline: float,
                   poll_interval_s: float) -> bool:
    """Progress `worker` until done() or the deadline; True if done."""
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        worker.progress_worker_event(max(1, int(min(left, poll_interval_s) * 1000)))
    return True


def byte_view(obj: object, *, writable: bool) -> np.ndarray:
    """A flat uint8 array sharing memory with a contiguous CPU tensor/array/buffer."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise TypeError(f"tensor is on {obj.device}; the UCX link moves host memory")
        if not obj.is_contiguous():
            raise TypeError("tensor must be contiguous")
        # bf16 has no numpy dtype: reinterpret as bytes first, then hand to numpy.
        arr = obj.detach().reshape(-1).view(torch.uint8).numpy()
    elif isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise TypeError("array must be C-contiguous")
        if writable and not obj.flags.writeable:
            raise TypeError("array is read-only")
        arr = obj.reshape(-1).view(np.uint8)
    else:
        view = memoryview(obj)  # type: ignore[arg-type]
        if not view.c_contiguous:
            raise TypeError("buffer must be contiguous")
        if writable and view.readonly:
            raise TypeError("buffer is read-only")
        arr = np.frombuffer(view.cast("B"), dtype=np.uint8)
    return arr


def pack_frame(tag: int, header_bytes: bytes) -> np.ndarray:
    return np.frombuffer(_TAG.pack(tag) + header_bytes, dtype=np.uint8).copy()


def split_frame(frame: np.ndarray) -> tuple[int, bytes]:
    raw = frame.tobytes()
    return _TAG.unpack_from(raw)[0], raw[_TAG.size:]


def pack_ack(status: int, reason: str = "") -> np.ndarray:
    text = reason.encode("utf-8")[:253]
    return np.frombuffer(_ACK.pack(status, len(text), text), dtype=np.uint8).copy()


def unpack_ack(frame: np.ndarray) -> tuple[int, str]:
    status, length, text = _ACK.unpack(frame.tobytes())
    return status, text[:min(length, 253)].decode("utf-8", "replace")


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
