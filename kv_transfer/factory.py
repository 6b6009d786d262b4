"""Picks the link implementation for a transport kind named in the spec."""
from __future__ import annotations

from kv_transfer.base import Link

TRANSPORTS = ("ucx", "nccl", "fake")


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("localhost", "::1")


def listener_factory(kind: str, host: str):
    """A callable (on_header, on_payload, on_error) -> listener for the receiver."""
    if kind == "ucx":
        from kv_transfer.ucx_link import LinkConfig, LinkListener
        if _is_loopback(host):
            # UCX over `lo` connects to 127.0.0.1 only (127.0.0.2 fails with "Endpoint is not
            # connected"); the listener binds every interface, so any loopback node reaches it.
            host = "127.0.0.1"
        config = LinkConfig(host=host, net_devices="lo" if _is_loopback(host) else None)
        return lambda h, p, e: LinkListener(h, p, e, config=config)
    if kind == "fake":
        from kv_transfer.fake import FakeListener
        return lambda h, p, e: FakeListener(h, p, e)
    if kind == "nccl":
        from kv_transfer.nccl import nccl_listener_factory
        return nccl_listener_factory(host)
    raise ValueError(f"transport.kind: unknown transport {kind!r} (one of {', '.join(TRANSPORTS)})")


def make_link(kind: str, host: str = "127.0.0.1", faults: dict | None = None) -> Link:
    """The sending end; `faults` (drop/delay/delay_s/corrupt/seed) wraps it for chaos tests."""
    link = _make_link(kind, host)
    if faults:
        from kv_transfer.faults import FaultyLink
        link = FaultyLink(link, **faults)
    return link


def _make_link(kind: str, host: str) -> Link:
    if kind == "ucx":
        from kv_transfer.ucx_link import LinkConfig, LinkSender
        return LinkSender(LinkConfig(host=host, net_devices="lo" if _is_loopback(host) else None))
    if kind == "fake":
        from kv_transfer.fake import FakeLink
        return FakeLink()
    if kind == "nccl":
        from kv_transfer.nccl import NcclLink
        return NcclLink()
    raise ValueError(f"transport.kind: unknown transport {kind!r} (one of {', '.join(TRANSPORTS)})")
