"""Typed exceptions that carry the gRPC status of a failed call."""

from __future__ import annotations

import re

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


# Ray Serve's gRPC proxy answers INTERNAL, with the actor's whole obituary (ids, pid, a guess at the OOM
# killer), where the replica serving a call died under it. The call never ran to an answer, and another
# replica takes the next one: to the caller it is UNAVAILABLE, retried as any such call is.
REPLICA_DIED = ("The actor died unexpectedly", "ActorDiedError", "ActorUnavailableError")


def _status(e: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """A failed call's code and details as gRPC gave them (UNKNOWN and the error's text where it has none)."""
    return (e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN,
            (e.details() if hasattr(e, "details") else None) or str(e))


def _replica_died(code: grpc.StatusCode, details: str) -> bool:
    return code == grpc.StatusCode.INTERNAL and any(sign in details for sign in REPLICA_DIED)


def code_of(e: grpc.RpcError) -> grpc.StatusCode:
    """The status of a failed call as the caller should read it (a Ray replica's death is UNAVAILABLE)."""
    code, details = _status(e)
    return grpc.StatusCode.UNAVAILABLE if _replica_died(code, details) else code


def _elsewhere(details: str, target: str | None) -> bool:
    """Whether gRPC's words name only addresses other than the client's own target: the server passed on
    a failure of one of its internal calls (the Ray wiring), which the TLS hint would misread."""
    ports = [address.rstrip(":,;").rsplit(":", 1)[-1] for address in re.findall(r"ipv[46]:(\S+)", details)]
    mine = target.rsplit(":", 1)[-1] if target and ":" in target else None
    return bool(ports) and mine is not None and mine not in ports


def from_rpc_error(e: grpc.RpcError, tls: bool | None = None, target: str | None = None) -> ArserveError:
    """The typed error of a failed call; ``tls``: whether the channel spoke
    TLS (None: unknown), for the hint an unreachable server gets;
    ``target``: the address the client dialled (a failure that names only
    other addresses is the server's, and gets no hint)."""
    code, details = _status(e)
    if _replica_died(code, details):  # Ray's obituary (actor ids, pid) is not the caller's business
        return Unavailable(grpc.StatusCode.UNAVAILABLE,
                           "the server replica serving this call died; another one takes the next call")
    if (code == grpc.StatusCode.UNAVAILABLE and any(sign in details for sign in NOT_SPOKEN)
            and not _elsewhere(details, target)):
        hint = TLS_HINT[tls if tls is not None else "WRONG_VERSION_NUMBER" in details]
        details = f"{details} ({hint})"
    return _BY_CODE.get(code, ArserveError)(code, details)
