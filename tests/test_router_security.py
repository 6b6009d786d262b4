"""TLS and API-key auth on the real gRPC server with a real client; the router behind it
is a stand-in that streams a fixed reply, since this tests the front door only."""
from __future__ import annotations

import asyncio
import subprocess

import grpc
import pytest

from cluster.client import stream_generate
from engine.output_processor import RequestOutput
from engine.request import FinishReason
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from router.server import GenerationServicer, start_server
from router.service import Progress


class EchoRouter:
    """Admits everything and streams two tokens."""

    request_timeout_s = 10.0

    def __init__(self):
        self.active, self.counts = {}, dict(admitted=0, finished=0, failed=0, cancelled=0)

    def admit(self, parsed):
        self.counts["admitted"] += 1
        return Progress("r1", list(parsed.prompt_token_ids))

    def release(self, progress, outcome):
        self.counts[outcome] += 1

    async def generate(self, parsed, progress, deadline):
        progress.sent = [7, 8]
        yield RequestOutput("r1", [7], "a")
        yield RequestOutput("r1", [8], "b", True, FinishReason.LENGTH)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from engine.loader import load_tokenizer
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return (d / "key.pem").read_bytes(), (d / "cert.pem").read_bytes()


def _serve_and_call(tokenizer, *, tls=None, api_keys=None, client_tls=None, metadata=None):
    async def main():
        servicer = GenerationServicer(EchoRouter(), tokenizer, max_model_len=8192, vocab_size=49152)
        server, port, _ = await start_server(servicer, "127.0.0.1", 0, api_keys=api_keys, tls=tls)
        try:
            creds = grpc.ssl_channel_credentials(client_tls) if client_tls else None
            target = f"127.0.0.1:{port}"
            async with (grpc.aio.secure_channel(target, creds) if creds
                        else grpc.aio.insecure_channel(target)) as ch:
                return await stream_generate(pb_grpc.GenerationStub(ch),
                                             pb.GenerateRequest(prompt="hi"), 10, metadata)
        finally:
            await server.stop(0)
    return asyncio.run(main())


def test_api_key_required(tokenizer):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _serve_and_call(tokenizer, api_keys=["s3cret"])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _serve_and_call(tokenizer, api_keys=["s3cret"], metadata=[("authorization", "Bearer nope")])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = _serve_and_call(tokenizer, api_keys=["s3cret"], metadata=[("authorization", "Bearer s3cret")])
    assert ok.token_ids == [7, 8] and ok.finish_reason == "length"


def test_tls_with_a_real_client(tokenizer, certs):
    key, cert = certs
    ok = _serve_and_call(tokenizer, tls=(key, cert), client_tls=cert, api_keys=["k"],
                         metadata=[("authorization", "Bearer k")])
    assert ok.text == "ab"
    with pytest.raises(grpc.aio.AioRpcError) as err:  # plaintext client against a TLS server
        _serve_and_call(tokenizer, tls=(key, cert))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
