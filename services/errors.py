"""Errors that become gRPC statuses.

Services raise these plain exceptions (no grpc import needed); one
interceptor in ``arserve.rpc`` turns them into status codes
(as TGI's ``interceptor.py`` does). Every message names what was wrong.
"""


class ArserveError(Exception):
    """Base class; ``code`` is the name of a ``grpc.StatusCode``."""

    code = "INTERNAL"


class InvalidArgument(ArserveError):
    code = "INVALID_ARGUMENT"


class NotFound(ArserveError):
    code = "NOT_FOUND"


class FailedPrecondition(ArserveError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ArserveError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ArserveError):
    code = "UNAVAILABLE"


class ReplicaLost(Unavailable):
    """The replica that held a request's state (its KV cache, its drafter
    context) stopped answering; another replica may take the request over."""


class Unimplemented(ArserveError):
    code = "UNIMPLEMENTED"


class Unauthenticated(ArserveError):
    code = "UNAUTHENTICATED"


class DeadlineExceeded(ArserveError):
    code = "DEADLINE_EXCEEDED"


def from_status(code: str, message: str) -> ArserveError:
    """The error a status stands for (a status carried in a message, as
    ``ScoreResult`` carries each call's): the class of that code, or a plain
    ArserveError with it; ``relayed`` marks it as another service's status."""
    for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable, Unimplemented,
                Unauthenticated, DeadlineExceeded):
        if cls.code == code:
            error = cls(message)
            break
    else:
        error = ArserveError(message)
        error.code = code
    error.relayed = True
    return error
