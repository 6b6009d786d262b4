"""The NCCL link imports everywhere and refuses cleanly without GPUs; the pair test
needs two GPUs and is skipped elsewhere."""
from __future__ import annotations

import pytest
import torch

from kv_transfer import nccl
from kv_transfer.factory import listener_factory, make_link

HAS_TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cpu_only_machine_gets_a_clear_error():
    with pytest.raises(RuntimeError, match="nccl needs CUDA"):
        make_link("nccl")
    with pytest.raises(RuntimeError, match="nccl needs CUDA"):
        listener_factory("nccl", "127.0.0.1")
    with pytest.raises(ValueError, match="transport.kind: unknown transport 'tcp'"):
        make_link("tcp")


@pytest.mark.skipif(not HAS_TWO_GPUS, reason="needs two CUDA devices")
def test_layer_lands_on_the_other_gpu():  # pragma: no cover - GPU machines only
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,))
    proc.start()
    address = parent.recv()
    torch.cuda.set_device(0)
    kv = torch.randn(2, 8, 3, 64, device="cuda:0")
    from kv_transfer.wire import WireHeader
    link = nccl.NcclLink()
    link.send(address, WireHeader.for_layer("r", b"\0" * 16, "fp", 0, 0, kv), kv)
    assert torch.equal(parent.recv(), kv.cpu())
    link.close()
    proc.join(30)


def _receiver(pipe):  # pragma: no cover - GPU machines only
    torch.cuda.set_device(1)
    got = {}

    def on_header(h):
        got["buf"] = torch.empty(h.shape, device="cuda:1")
        return got["buf"]

    listener = nccl.NcclListener(on_header, lambda h, b: pipe.send(b.cpu()))
    pipe.send(listener.address)
    import time
    time.sleep(20)
