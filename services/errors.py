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
