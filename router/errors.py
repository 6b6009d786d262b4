"""Errors the router turns into gRPC status codes."""
from __future__ import annotations

from grpc import StatusCode


class RouterError(Exception):
    def __init__(self, code: StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


__all__ = ["RouterError", "StatusCode"]
