"""The KV wire header: round trips, every corruption -> WireError, fuzzing."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_transfer.wire import (
    HEADER_SIZE, MAGIC, NO_TOKEN, DType, MessageKind, WireError, WireHeader, new_fencing_token,
    pack, unpack)

TOKEN = new_fencing_token()


def layer(**overrides) -> WireHeader:
    fields = dict(kind=MessageKind.LAYER, request_id="req-7", fencing_token=TOKEN,
                  model_fingerprint="smollm2-135m:fp32", layer=3, token_start=16,
                  token_end=48, dtype=DType.BFLOAT16, shape=(2, 32, 3, 64),
                  payload_nbytes=2 * 32 * 3 * 64 * 2)
    fields.update(overrides)
    return WireHeader(**fields)


def with_crc(body: bytes) -> bytes:
    """Re-seal an edited header so the field checks, not the checksum, must catch it."""
    body = body[:HEADER_SIZE - 4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("header", [
    layer(),
    layer(dtype=DType.FLOAT32, payload_nbytes=2 * 32 * 3 * 64 * 4),
    layer(dtype=DType.FLOAT16, request_id="é" * 64, model_fingerprint="m" * 128),
    layer(fencing_token=2**128 - 1, layer=2**32 - 1),
    WireHeader(MessageKind.DONE, "req-7", TOKEN, "fp", token_end=48, first_token=49151),
    WireHeader(MessageKind.ABORT, "r" * 128, TOKEN, ""),
])
def test_round_trip(header: WireHeader) -> None:
    data = pack(header)
    assert len(data) == HEADER_SIZE
    assert unpack(data) == header
    assert unpack(bytearray(data)) == header and unpack(memoryview(data)) == header


def test_int_fencing_token_is_stored_as_bytes() -> None:
    header = layer(fencing_token=12345)
    assert header.fencing_token == (12345).to_bytes(16, "little")
    assert header == layer(fencing_token=(12345).to_bytes(16, "little"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_for_layer_describes_the_tensor(dtype: torch.dtype) -> None:
    kv = torch.zeros(2, 5, 3, 64, dtype=dtype)
    header = WireHeader.for_layer("r", TOKEN, "fp", layer=2, token_start=10, kv=kv)
    assert (header.token_start, header.token_end, header.num_tokens) == (10, 15, 5)
    assert header.dtype.torch == dtype and header.shape == (2, 5, 3, 64)
    assert header.payload_nbytes == kv.numel() * kv.element_size()


@pytest.mark.parametrize("overrides, message", [
    (dict(request_id=""), "empty"),
    (dict(request_id="x" * 129), "more than 128"),
    (dict(request_id="é" * 65), "more than 128"),
    (dict(request_id="\ud800"), "UTF-8"),
    (dict(model_fingerprint="f" * 129), "more than 128"),
    (dict(fencing_token=b"short"), "16 bytes"),
    (dict(fencing_token=2**128), "2\\*\\*128"),
    (dict(fencing_token=-1), "2\\*\\*128"),
    (dict(shape=(2, 31, 3, 64)), "token_end - token_start"),
    (dict(shape=(3, 32, 3, 64)), "token_end - token_start"),
    (dict(shape=(2, 32, 3)), "4 dims"),
    (dict(payload_nbytes=1), "payload_nbytes 1"),
    (dict(token_start=50), "reversed"),
    (dict(layer=-1), "layer"),
    (dict(layer=2**32), "layer"),
    (dict(first_token=5), "only carried by DONE"),
    (dict(kind=9), "MessageKind"),
    (dict(dtype=7), "DType"),
])
def test_invalid_headers_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(WireError, match=message):
        layer(**overrides)


def test_control_messages_carry_no_payload() -> None:
    with pytest.raises(WireError, match="no payload"):
        WireHeader(MessageKind.DONE, "r", TOKEN, "fp", first_token=1, payload_nbytes=4)
    with pytest.raises(WireError, match="first_token >= 0"):
        WireHeader(MessageKind.DONE, "r", TOKEN, "fp")
    assert WireHeader(MessageKind.ABORT, "r", TOKEN, "fp").first_token == NO_TOKEN


def test_unknown_torch_dtype() -> None:
    with pytest.raises(WireError, match="no wire code"):
        DType.from_torch(torch.int8)


def test_bad_magic() -> None:
    data = b"XXXX" + pack(layer())[4:]
    with pytest.raises(WireError, match="bad magic"):
        unpack(data)


def test_bad_version() -> None:
    data = bytearray(pack(layer()))
    data[4:6] = struct.pack("<H", 99)
    with pytest.raises(WireError, match="version 99"):
        unpack(with_crc(bytes(data)))


@pytest.mark.parametrize("length", [0, 1, 4, HEADER_SIZE - 1, HEADER_SIZE + 1])
def test_truncated_or_overlong(length: int) -> None:
    data = (pack(layer()) * 2)[:length]
    with pytest.raises(WireError, match="truncated"):
        unpack(data)


def test_flipped_bit_fails_the_checksum() -> None:
    data = bytearray(pack(layer()))
    data[100] ^= 0x10
    with pytest.raises(WireError, match="checksum"):
        unpack(bytes(data))


def test_inconsistent_lengths_behind_a_valid_checksum() -> None:
    good = pack(layer())
    rid_len_at = 4 + 2 + 1 + 1
    # request_id length past its field
    bad = bytearray(good)
    bad[rid_len_at:rid_len_at + 2] = struct.pack("<H", 200)
    with pytest.raises(WireError, match="request_id length 200"):
        unpack(with_crc(bytes(bad)))
    # payload_nbytes that disagrees with the shape
    bad = bytearray(good)
    payload_at = HEADER_SIZE - 4 - 16
    bad[payload_at:payload_at + 8] = struct.pack("<Q", 7)
    with pytest.raises(WireError, match="payload_nbytes 7"):
        unpack(with_crc(bytes(bad)))
    # bytes hidden after the request id's declared length
    bad = bytearray(good)
    bad[rid_len_at + 2 + 100] = 1
    with pytest.raises(WireError, match="after its declared length"):
        unpack(with_crc(bytes(bad)))
    # a request id that is not UTF-8
    bad = bytearray(good)
    bad[rid_len_at + 2] = 0xFF
    with pytest.raises(WireError, match="UTF-8"):
        unpack(with_crc(bytes(bad)))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2 * HEADER_SIZE))
def test_fuzz_random_bytes_only_raise_wire_error(data: bytes) -> None:
    try:
        unpack(data)
    except WireError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=HEADER_SIZE - 10, max_size=HEADER_SIZE - 10))
def test_fuzz_sealed_garbage_only_raises_wire_error(tail: bytes) -> None:
    # Right magic, version and checksum, random fields: the field checks must hold.
    data = with_crc(MAGIC + struct.pack("<H", 1) + tail + b"\0\0\0\0")
    try:
        header = unpack(data)
    except WireError:
        return
    assert pack(header) == data


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=32), st.integers(0, 2**128 - 1),
       st.integers(0, 10_000), st.integers(1, 64), st.sampled_from(list(DType)),
       st.integers(1, 8), st.integers(1, 256))
def test_fuzz_valid_headers_round_trip(rid: str, token: int, start: int, tokens: int,
                                       dtype: DType, heads: int, dim: int) -> None:
    try:
        header = layer(request_id=rid, fencing_token=token, token_start=start,
                       token_end=start + tokens, dtype=dtype, shape=(2, tokens, heads, dim),
                       payload_nbytes=2 * tokens * heads * dim * dtype.itemsize)
    except WireError:
        return  # e.g. a request id over 128 bytes of UTF-8
    assert unpack(pack(header)) == header
