"""Typed exceptions that carry the gRPC status of a failed call."""

from __future__ import annotations

import grpc


class ArserveError(Exception):
    """A failed call: ``code`` is the ``grpc.StatusCode``, ``details`` the
    server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(ArserveError):
    pass


class NotFound(ArserveError):
    pass


class ResourceExhausted(ArserveError):
    pass


class Unauthenticated(ArserveError):
    pass


class Unavailable(ArserveError):
    pass


class DeadlineExceeded(ArserveError):
    pass


class Cancelled(ArserveError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


# What gRPC says when one side speaks TLS and the other does not, and what to do about it.
TLS_MISMATCH = (
    ("WRONG_VERSION_NUMBER", "the TLS handshake got no TLS answer: does the server serve TLS? Connect "
                             "without tls/root_certificates (the CLI without --tls/--ca)"),
    ("Socket closed", "if the server serves TLS, connect with tls=True or root_certificates (the CLI's --tls "
                      "or --ca)"),
)


def from_rpc_error(e: grpc.RpcError) -> ArserveError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = next((hint for sign, hint in TLS_MISMATCH if sign in details), None)
        details = f"{details} ({hint})" if hint else details
    return _BY_CODE.get(code, ArserveError)(code, details)
