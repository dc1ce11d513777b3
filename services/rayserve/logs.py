"""What Ray Serve logs of a caller's errors, in the gateway replicas and in
Ray's proxy: one INFO line with the status, not an ERROR with a traceback.

Ray Serve logs every exception a deployment raises as an ERROR with its
traceback ("Request failed."), in the replica, and again in its gRPC proxy
("Request failed with user-set gRPC status code"); a stream the client
closes is a ``GeneratorExit`` there ("Request failed due to unexpected
error."). The gateway raises a caller's error (bad input, no token,
overload, a passed deadline) so that the proxy answers with its status; a
log alerting on ERROR then fired two tracebacks per bad request. A fault of
the server keeps its ERROR and traceback.
"""

from __future__ import annotations

import asyncio
import logging

from ..rpc import callers_error

SERVE_LOGGER = "ray.serve"  # where Ray Serve's replicas and proxies log a failed request


class CallersErrorsAsInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and record.exc_info[1] is not None:
            e = getattr(record.exc_info[1], "original_exception", record.exc_info[1])  # Ray wraps it
            if isinstance(e, (GeneratorExit, asyncio.CancelledError)) and str(record.msg).startswith(
                    "Request failed"):  # the client left its stream (Ray's proxy's record of that request)
                self._as_info(record, "%s the client closed its call", (record.getMessage(),))
            elif (status := callers_error(e)) is not None:
                self._as_info(record, "%s %s: %s", (record.getMessage(), status[0].name, status[1]))
        return True

    @staticmethod
    def _as_info(record: logging.LogRecord, msg: str, args: tuple) -> None:
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = msg, args
        record.exc_info = record.exc_text = None


def callers_errors_as_info() -> None:
    """Install the filter on Ray Serve's logger in this process (once)."""
    serve_log = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, CallersErrorsAsInfo) for f in serve_log.filters):
        serve_log.addFilter(CallersErrorsAsInfo())
