"""The one exception the client raises for a failed call."""
from __future__ import annotations

import grpc


class TiergateError(Exception):
    """A call tiergate refused or could not answer: `code` is the gRPC status
    (INVALID_ARGUMENT for a bad request, RESOURCE_EXHAUSTED when shed, UNAVAILABLE when the
    server cannot be reached, DEADLINE_EXCEEDED past the timeout), `details` the server's
    message, and `retry_after_s` the server's grpc-retry-pushback-ms, when it sent one."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        # Pickled (a process pool, a task queue) with what __init__ takes, not the message.
        return (type(self), (self.code, self.details, self.retry_after_s))

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "TiergateError":
        # Raised RpcErrors of unary calls are also grpc.Call (code, details, metadata).
        code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
        # The server's gRPC stack (tonic) ends a call whose grpc-timeout passed on its side
        # with CANCELLED "Timeout expired"; whichever side notices first, the caller's timeout
        # passed: DEADLINE_EXCEEDED, as documented.
        if code == grpc.StatusCode.CANCELLED and details == "Timeout expired":
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        retry = None
        if isinstance(e, grpc.Call):
            for k, v in e.trailing_metadata() or ():
                if k == "grpc-retry-pushback-ms":
                    try:
                        retry = int(v) / 1000.0
                    except (TypeError, ValueError):
                        pass
        return cls(code, details, retry)
