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


# What to try where a call found no server it could speak to: one side may speak TLS and the other not.
TLS_HINT = {
    True: "does the server serve TLS? If not, connect without tls/root_certificates (the CLI without --tls/--ca)",
    False: "is the server up at that address? If it serves TLS, connect with tls=True or root_certificates "
           "(the CLI's --tls or --ca)",
}
# gRPC's words for it: a TLS handshake that got something else; a plaintext connection the server closed
# (its last error may instead be another address's "Connection refused": localhost is ::1 too)
NOT_SPOKEN = ("WRONG_VERSION_NUMBER", "Socket closed", "failed to connect to all addresses")


def from_rpc_error(e: grpc.RpcError, tls: bool | None = None) -> ArserveError:
    """The typed error of a failed call; ``tls``: whether the channel spoke
    TLS (None: unknown), for the hint an unreachable server gets."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    if code == grpc.StatusCode.UNAVAILABLE and any(sign in details for sign in NOT_SPOKEN):
        hint = TLS_HINT[tls if tls is not None else "WRONG_VERSION_NUMBER" in details]
        details = f"{details} ({hint})"
    return _BY_CODE.get(code, ArserveError)(code, details)
