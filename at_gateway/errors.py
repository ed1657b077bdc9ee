"""One exception hierarchy, mapped to HTTP statuses in one place.

Everything the gateway says to a client in an error is an instance of
:class:`GatewayError`; the server turns it into an OpenAI-shaped JSON body
with :meth:`GatewayError.to_body`. Anything else escaping a handler is a bug
and becomes a generic 500 without a traceback on the wire.
"""

from __future__ import annotations

import json
from typing import Any


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.extra = extra or {}
        self.headers = headers or []

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code}
        err.update(self.extra)
        return {"error": err}

    def to_body(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class AdminDisabled(Forbidden):
    code = "admin_disabled"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamFailed(GatewayError):
    status = 502
    type = "upstream_error"
    code = "all_steps_failed"


class UpstreamTimedOut(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "unavailable"


class StepFailed(Exception):
    """One route step failed; routing records it and tries the next step.

    ``status`` is the upstream HTTP status when there was one, ``None`` for a
    connection error, a timeout or a malformed answer. ``body`` is the
    upstream's error object when it sent an OpenAI-shaped one. ``retry_after``: the seconds the upstream
    asked to wait (its Retry-After and kin, read where the adapter read the answer), for cooldowns and retries.
    """

    retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        timeout: bool = False,
        error: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.timeout = timeout
        self.error = error


class ConfigError(Exception):
    """Bad configuration: every problem, each with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s) in the configuration:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
