"""A small gRPC client for pdserve.v1.Generation (CLI, benchmarks, tests)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc


def sampling_message(max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                     stop=(), ignore_eos: bool = False, **extra) -> pb.SamplingParams:
    msg = pb.SamplingParams(stop=list(stop), ignore_eos=ignore_eos, **extra)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(msg, name, value)
    return msg


@dataclass
class StreamResult:
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: dict = field(default_factory=dict)
    ttft_s: float | None = None  # measured by the client
    token_times: list[float] = field(default_factory=list)  # arrival of each message with tokens
    e2e_s: float = 0.0


async def stream_generate(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest,
                          timeout_s: float | None = None, metadata=None,
                          on_message=None) -> StreamResult:
    """Runs one Generate stream to its end; raises grpc.aio.AioRpcError on a status error."""
    start = time.perf_counter()
    result = StreamResult()
    async for msg in stub.Generate(request, timeout=timeout_s, metadata=metadata):
        now = time.perf_counter() - start
        result.request_id = msg.request_id
        if msg.token_ids:
            if result.ttft_s is None:
                result.ttft_s = now
            result.token_times.append(now)
        result.token_ids += msg.token_ids
        result.text += msg.text
        if on_message is not None:
            on_message(msg)
        if msg.finish_reason:
            result.finish_reason = pb.FinishReason.Name(msg.finish_reason).removeprefix(
                "FINISH_REASON_").lower()
            result.usage = dict(prompt_tokens=msg.usage.prompt_tokens,
                                completion_tokens=msg.usage.completion_tokens,
                                cached_prompt_tokens=msg.usage.cached_prompt_tokens)
    result.e2e_s = time.perf_counter() - start
    return result


def channel(address: str, tls_ca: bytes | None = None) -> grpc.aio.Channel:
    if tls_ca is not None:
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(tls_ca))
    return grpc.aio.insecure_channel(address)


async def stream_chunks(stub, request, timeout_s=None, metadata=None) -> AsyncIterator[pb.GenerateResponse]:
    async for msg in stub.Generate(request, timeout=timeout_s, metadata=metadata):
        yield msg
