"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Raise an `ApiError` (or one of the helpers below) anywhere a request is handled; the HTTP layer
turns it into the JSON body (`ApiError.body()`), or, once a stream has started, into an SSE error
event (`api.sse.error_event`). Messages say what was wrong and how to fix it.
"""

from __future__ import annotations

from typing import Any

# The `type` OpenAI uses for each status class; anything else 5xx is a server error.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ApiError(Exception):
    """A request failed with `status`; `body()` is OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, code={self.code!r})"


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object; `code` is a string (e.g. "model_not_found") or null, never a number."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str, code: str = "invalid_api_key") -> ApiError:
    return ApiError(401, message, code=code)


def forbidden(message: str) -> ApiError:
    return ApiError(403, message, code="forbidden")


def not_found(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(404, message, param=param, code=code)


def too_large(message: str) -> ApiError:
    return ApiError(413, message, code="request_too_large")


def rate_limited(message: str, retry_after_s: int = 1) -> ApiError:
    headers = {"Retry-After": str(retry_after_s)}
    return ApiError(429, message, code="rate_limit_exceeded", headers=headers)


def server_error(message: str, status: int = 500, code: str | None = None) -> ApiError:
    return ApiError(status, message, code=code)


DRAINING = "draining"  # the code of a node's refusal while it drains (and of /health's status)


def draining(message: str) -> ApiError:
    """A node that is shutting down refuses new work (or ends what it could not finish): a 503
    with code "draining", which the gateway retries on another instance without counting it
    against this one."""
    return ApiError(503, message, code=DRAINING)


def from_body(status: int, body: Any) -> ApiError:
    """An `ApiError` from someone else's error response (OpenAI shape or not)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or f"HTTP {status}")
        return ApiError(
            status,
            message,
            type=error.get("type"),
            param=error.get("param"),
            code=_code_text(error.get("code")),
        )
    if isinstance(error, str):
        return ApiError(status, error)
    return ApiError(status, f"HTTP {status}: {str(body)[:500]}")


def _code_text(code: Any) -> str | None:
    """Someone else's `code` as ours is: a string or None (SGLang's nodes send numbers)."""
    return None if code is None else str(code)
