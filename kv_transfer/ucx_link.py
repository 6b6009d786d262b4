"""Point-to-point message link over UCX: the byte-moving layer of the KV handoff.

One message = a wire header (kv_transfer/wire.py) plus, for LAYER, a payload
that lands straight in a buffer the receiver chooses after seeing the header.

    sender (LinkSender.send)                receiver (LinkListener thread)
    stream: [payload tag | header]  ----->  unpack header -> on_header(header)
    tag:    payload (rendezvous)    ----->  probe tag, check length, receive
                                            into the returned buffer
                                            -> on_payload(header, buffer)
    stream: ack                     <-----  ok / refused + reason

The control frames go over the endpoint's UCX stream, which is ordered per
connection; payloads go by tag send/receive, one random 64-bit tag per message,
so a payload is received into preallocated memory (active messages would
allocate) and its length is checked against the header before it is taken.

Threading contract
------------------
- LinkListener owns one thread; it alone touches its UCX worker. on_header,
  on_payload and on_error are called on that thread, one at a time, never
  concurrently. Keep them short: while one runs, no connection of this
  listener moves. To reach an asyncio loop (a Ray async actor), use
  `loop.call_soon_threadsafe`; to reach other threads, a lock or a queue.
- on_header(header) -> buffer | None is called for messages with a payload:
  return a writable, contiguous CPU tensor/ndarray/buffer of exactly
  header.payload_nbytes (any shape or dtype; the bytes are copied in), or
  None (or raise LinkRefused(reason)) to refuse. A refused payload is drained
  and the sender's send raises LinkRefused; the connection stays usable.
  The owner must not touch the buffer until on_payload or on_error names
  that message: UCX writes into it in between.
- on_payload(header, buffer) is called once the payload has landed (buffer is
  None for DONE/ABORT, which skip on_header). Raising LinkRefused (or
  anything) there refuses the message: the sender sees LinkRefused.
- on_error(LinkPeerLost) is called when a connection fails (peer killed,
  reset, protocol error, a payload not landing within message_timeout_s),
  with the in-flight header and every request that had LAYERs on that
  connection and no DONE/ABORT yet. The listener itself keeps running.
- LinkSender is thread-safe (one lock); it has no thread of its own and
  progresses UCX inside send(), on the caller's thread. send() blocks until
  the receiver acked (or raises); run it off the compute thread to overlap.

Transport and speed (benchmarks/transfer_link_bench.py): the blocking UCXX
API (the asyncio one measured 2-3x slower), TCP on loopback with 1 MiB
segments, put_zcopy rendezvous and eager sends below 256 KiB: about 0.8-1.3x a
raw Python socket at 64-256 MiB, ~0.4x at 1 MiB (~0.35 ms per message of
fixed cost, twice the socket's). Shared memory is 2-4x the socket on an idle
host but is opt-in (LinkConfig.shared_memory): a sender killed mid-write
wedges the receiver's shared FIFO for every sender.

Failure model: endpoint error handling is on, so a killed peer surfaces as a
connection reset on the other side (measured: 0.02-0.07 s), and every wait
has a deadline. UCX must not be initialised before a fork: create these in the
process that uses them (Ray actors and 'spawn' children are fine).
"""

from kv_transfer.ucx_link_common import (
    Address, LinkConfig, LinkError, LinkPeerLost, LinkRefused, LinkTimeout)
from kv_transfer.ucx_link_listener import LinkListener, OnError, OnHeader, OnPayload
from kv_transfer.ucx_link_sender import LinkSender

__all__ = [
    "Address", "LinkConfig", "LinkError", "LinkListener", "LinkPeerLost", "LinkRefused",
    "LinkSender", "LinkTimeout", "OnError", "OnHeader", "OnPayload",
]
