"""Fixed-layout binary header for one KV transfer message.

A message carries one layer's K/V for one request's token range, laid out
`[2, num_tokens, kv_heads, head_dim]` in the sender's dtype, or a control
message with no payload (DONE with the first sampled token, ABORT).

Layout (little-endian, no padding, HEADER_SIZE bytes):

    magic 4s | version u16 | kind u8 | dtype u8
    request_id_len u16 | request_id 128s
    fencing_token 16s
    layer u32 | token_start u64 | token_end u64 | shape 4 x u32
    fingerprint_len u16 | fingerprint 128s
    payload_nbytes u64 | first_token i64
    crc32 u32   (of every byte before it)

`unpack` is fed bytes from the network: any input must end in a header or a
WireError, never another exception.
"""

from __future__ import annotations

import enum
import functools
import math
import secrets
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAGIC = b"PDKV"
VERSION = 1
MAX_REQUEST_ID_BYTES = 128
MAX_FINGERPRINT_BYTES = 128
FENCING_TOKEN_BYTES = 16
NO_TOKEN = -1

_BODY = struct.Struct("<4sHBBH128s16sIQQ4IH128sQq")
_CRC = struct.Struct("<I")
HEADER_SIZE = _BODY.size + _CRC.size

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


class WireError(ValueError):
    """A header that cannot be encoded, or bytes that are not a valid header."""


class MessageKind(enum.IntEnum):
    LAYER = 1  # one layer's K/V for a token range; has a payload
    DONE = 2  # all layers sent; carries the first sampled token
    ABORT = 3  # the sender gives up on this request


class DType(enum.IntEnum):
    FLOAT32 = 1
    BFLOAT16 = 2
    FLOAT16 = 3

    @property
    def itemsize(self) -> int:
        return 4 if self is DType.FLOAT32 else 2

    @property
    def torch(self) -> torch.dtype:
        return _torch_dtypes()[self]

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> DType:
        for code, torch_dtype in _torch_dtypes().items():
            if torch_dtype == dtype:
                return code
        raise WireError(f"dtype {dtype} has no wire code (float32, bfloat16, float16)")


@functools.cache
def _torch_dtypes() -> dict[DType, torch.dtype]:
    import torch  # only callers that hold tensors pay for the import

    return {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16,
            DType.FLOAT16: torch.float16}


def new_fencing_token() -> bytes:
    return secrets.token_bytes(FENCING_TOKEN_BYTES)


def _check_uint(name: str, value: object, limit: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise WireError(f"{name} must be an integer in [0, {limit}], got {value!r}")


def _check_text(name: str, value: object, limit: int) -> None:
    if not isinstance(value, str):
        raise WireError(f"{name} must be a str, got {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise WireError(f"{name} cannot be encoded as UTF-8: {e}") from None
    if len(encoded) > limit:
        raise WireError(f"{name} is {len(encoded)} bytes of UTF-8, more than {limit}")


@dataclass(frozen=True)
class WireHeader:
    kind: MessageKind
    request_id: str
    fencing_token: bytes  # 16 bytes; an int in [0, 2**128) is accepted and converted
    model_fingerprint: str
    layer: int = 0
    token_start: int = 0
    token_end: int = 0
    dtype: DType = DType.FLOAT32
    shape: tuple[int, int, int, int] = (0, 0, 0, 0)  # [2, num_tokens, kv_heads, head_dim]
    payload_nbytes: int = 0
    first_token: int = NO_TOKEN  # DONE only

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", MessageKind(self.kind))
            object.__setattr__(self, "dtype", DType(self.dtype))
        except ValueError as e:
            raise WireError(str(e)) from None
        token = self.fencing_token
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < 2 ** (8 * FENCING_TOKEN_BYTES):
                raise WireError("fencing_token int must be in [0, 2**128)")
            token = token.to_bytes(FENCING_TOKEN_BYTES, "little")
        if not isinstance(token, (bytes, bytearray)) or len(token) != FENCING_TOKEN_BYTES:
            raise WireError(f"fencing_token must be {FENCING_TOKEN_BYTES} bytes or an int")
        object.__setattr__(self, "fencing_token", bytes(token))
        if not isinstance(self.shape, (tuple, list)):
            raise WireError(f"shape must be a tuple of 4 ints, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(self.shape))

        _check_text("request_id", self.request_id, MAX_REQUEST_ID_BYTES)
        if not self.request_id:
            raise WireError("request_id is empty")
        _check_text("model_fingerprint", self.model_fingerprint, MAX_FINGERPRINT_BYTES)
        _check_uint("layer", self.layer, _U32_MAX)
        _check_uint("token_start", self.token_start, _U64_MAX)
        _check_uint("token_end", self.token_end, _U64_MAX)
        _check_uint("payload_nbytes", self.payload_nbytes, _U64_MAX)
        if len(self.shape) != 4:
            raise WireError(f"shape must have 4 dims, got {self.shape!r}")
        for dim in self.shape:
            _check_uint("shape dim", dim, _U32_MAX)
        if self.token_end < self.token_start:
            raise WireError(f"token range [{self.token_start}, {self.token_end}) is reversed")
        if (not isinstance(self.first_token, int) or isinstance(self.first_token, bool)
                or not NO_TOKEN <= self.first_token < 2**63):
            raise WireError(f"first_token must be an int >= -1, got {self.first_token!r}")

        if self.kind is MessageKind.LAYER:
            if self.shape[0] != 2 or self.shape[1] != self.token_end - self.token_start:
                raise WireError(
                    f"LAYER shape {self.shape} must be [2, token_end - token_start "
                    f"= {self.token_end - self.token_start}, kv_heads, head_dim]")
            expected = math.prod(self.shape) * self.dtype.itemsize
            if self.payload_nbytes != expected:
                raise WireError(f"payload_nbytes {self.payload_nbytes} != {expected} "
                                f"implied by shape {self.shape} and {self.dtype.name}")
            if self.first_token != NO_TOKEN:
                raise WireError("first_token is only carried by DONE")
        else:
            if self.payload_nbytes != 0 or any(self.shape):
                raise WireError(f"{self.kind.name} carries no payload; shape and "
                                "payload_nbytes must be zero")
            if self.kind is MessageKind.DONE and self.first_token < 0:
                raise WireError("DONE must carry first_token >= 0")
            if self.kind is MessageKind.ABORT and self.first_token != NO_TOKEN:
                raise WireError("first_token is only carried by DONE")

    @classmethod
    def for_layer(cls, request_id: str, fencing_token: bytes | int, model_fingerprint: str,
                  layer: int, token_start: int, kv: torch.Tensor) -> WireHeader:
        """Header for `kv` shaped [2, num_tokens, kv_heads, head_dim]."""
        if kv.dim() != 4:
            raise WireError(
                f"kv must be [2, num_tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
        return cls(MessageKind.LAYER, request_id, fencing_token, model_fingerprint,
                   layer=layer, token_start=token_start, token_end=token_start + kv.shape[1],
                   dtype=DType.from_torch(kv.dtype), shape=tuple(kv.shape),
                   payload_nbytes=kv.numel() * kv.element_size())

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


def pack(header: WireHeader) -> bytes:
    body = _BODY.pack(
        MAGIC, VERSION, header.kind, header.dtype,
        len(rid := header.request_id.encode("utf-8")), rid,
        header.fencing_token,
        header.layer, header.token_start, header.token_end, *header.shape,
        len(fp := header.model_fingerprint.encode("utf-8")), fp,
        header.payload_nbytes, header.first_token)
    return body + _CRC.pack(zlib.crc32(body))


def _decode_text(name: str, raw: bytes, length: int, limit: int) -> str:
    if length > limit:
        raise WireError(f"{name} length {length} exceeds {limit}")
    if any(raw[length:]):
        raise WireError(f"{name} has bytes after its declared length")
    try:
        return raw[:length].decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"{name} is not valid UTF-8: {e}") from None


def unpack(buf: bytes | bytearray | memoryview) -> WireHeader:
    """Decode a header; raise WireError on anything but a valid one."""
    data = bytes(buf)
    if len(data) != HEADER_SIZE:
        raise WireError(f"header is {len(data)} bytes, expected {HEADER_SIZE} (truncated?)")
    if data[:4] != MAGIC:
        raise WireError(f"bad magic {data[:4]!r}, expected {MAGIC!r}: not a pdserve KV header")
    fields = _BODY.unpack_from(data)
    version = fields[1]
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this side speaks {VERSION})")
    (crc,) = _CRC.unpack_from(data, _BODY.size)
    if crc != zlib.crc32(data[:_BODY.size]):
        raise WireError("header checksum mismatch: corrupted in transit")
    (_, _, kind, dtype, rid_len, rid, token, layer, start, end,
     s0, s1, s2, s3, fp_len, fp, payload_nbytes, first_token) = fields
    return WireHeader(
        kind=kind,
        request_id=_decode_text("request_id", rid, rid_len, MAX_REQUEST_ID_BYTES),
        fencing_token=token,
        model_fingerprint=_decode_text("model_fingerprint", fp, fp_len, MAX_FINGERPRINT_BYTES),
        layer=layer, token_start=start, token_end=end, dtype=dtype, shape=(s0, s1, s2, s3),
        payload_nbytes=payload_nbytes, first_token=first_token)
