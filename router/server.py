"""The gRPC front door: pdserve.v1.Generation over grpc.aio, with health and reflection.

Generate validates (INVALID_ARGUMENT naming the field), admits (RESOURCE_EXHAUSTED past
the bound), then streams the Router's outputs as text deltas. A client that cancels,
or whose deadline passes, ends the handler; the Router's cleanup frees the request's
blocks on both workers.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.sampling_params import InvalidRequestError
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from router.errors import RouterError
from router.responses import response_from_output
from router.service import Router, finish_outcome
from router.validation import parse_generate_request

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, tokenizer, *, max_model_len: int, vocab_size: int,
                 metrics=None):
        self.router = router
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.metrics = metrics

    async def _reject(self, context, code: grpc.StatusCode, message: str):
        if self.metrics:
            self.metrics.rejected(code)
        await context.abort(code, message)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            parsed = parse_generate_request(request, tokenizer=self.tokenizer,
                                            max_model_len=self.max_model_len,
                                            vocab_size=self.vocab_size)
        except InvalidRequestError as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            progress = self.router.admit(parsed)
        except RouterError as exc:
            await self._reject(context, exc.code, exc.message)
        if self.metrics:
            self.metrics.admitted()
        remaining = context.time_remaining()
        timeout = self.router.request_timeout_s if remaining is None else min(
            remaining, self.router.request_timeout_s)
        deadline = time.monotonic() + timeout
        outcome, reason, error = "failed", None, None
        stream = self.router.generate(parsed, progress, deadline)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                try:  # per message, so a stalled worker cannot outlive the deadline
                    out = await asyncio.wait_for(stream.__anext__(), left)
                except StopAsyncIteration:
                    break
                if out.finished:
                    reason = out.finish_reason
                    outcome = finish_outcome(reason)
                    out.num_prompt_tokens = len(progress.prompt)
                    out.num_output_tokens = len(progress.sent)
                    out.num_cached_tokens = progress.cached_tokens
                    yield response_from_output(out, request_id=progress.request_id,
                                               timing=self._timing(progress),
                                               tokenizer=self.tokenizer)
                    break
                if out.new_token_ids or out.new_text:
                    yield response_from_output(out, request_id=progress.request_id,
                                               tokenizer=self.tokenizer)
        except RouterError as exc:
            error = exc
        except (TimeoutError, asyncio.TimeoutError):
            error = RouterError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {progress.request_id!r} ran past its deadline "
                                f"({timeout:.1f} s)")
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            await stream.aclose()
            self.router.release(progress, outcome)
            self._observe(progress, reason or outcome)
        if error is not None:
            await context.abort(error.code, error.message)

    def _timing(self, progress) -> pb.Timing:
        now = time.monotonic()
        t = pb.Timing(e2e_s=now - progress.arrival)
        if progress.started_at:
            t.queue_s = progress.started_at - progress.arrival
        if progress.first_token_at:
            t.ttft_s = progress.first_token_at - progress.arrival
        return t

    def _observe(self, progress, reason) -> None:
        if not self.metrics:
            return
        now = time.monotonic()
        ttft = progress.first_token_at - progress.arrival if progress.first_token_at else None
        n = len(progress.sent)
        tpot = (now - progress.first_token_at) / (n - 1) if progress.first_token_at and n > 1 else None
        self.metrics.observe_request(ttft, tpot, now - progress.arrival, reason,
                                     len(progress.prompt), n)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` on every call but the health check."""

    def __init__(self, keys: list[str]):
        self.keys = {f"Bearer {k}" for k in keys}

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send 'authorization: Bearer <key>'")
        self._deny = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") in self.keys:
            return await continuation(details)
        return self._deny if "Generate" in details.method else self._deny_unary


async def start_server(servicer: GenerationServicer, host: str, port: int, *,
                       api_keys: list[str] | None = None, tls: tuple[bytes, bytes] | None = None
                       ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts the server; returns it, the bound port and its health servicer."""
    interceptors = [ApiKeyInterceptor(api_keys)] if api_keys else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls:
        key, cert = tls
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"router.port: cannot listen on {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
