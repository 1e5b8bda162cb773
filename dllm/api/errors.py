"""API errors in OpenAI's schema: ``{"error": {"message", "type", "param", "code"}}``.

Handlers raise ``ApiError``; the error middleware (server.py) turns it, aiohttp's own HTTP errors
(404 route, 405 method, 413 body) and anything unexpected into this JSON, so every error a
client sees has the same shape.
"""
from __future__ import annotations

import json

from aiohttp import web

from dllm.errors import DllmError

INVALID = "invalid_request_error"


class ApiError(DllmError):
    def __init__(self, status: int, message: str, type: str = INVALID, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, INVALID, param, code)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist", INVALID, "model", "model_not_found")


def rate_limited(retry_after: str) -> ApiError:
    return ApiError(429, f"Rate limit reached for free requests. Please try again in {retry_after}s.",
                    "requests", None, "rate_limit_exceeded", {"Retry-After": retry_after})


def busy(message: str) -> ApiError:
    return ApiError(503, message, "server_error", None, "server_busy", {"Retry-After": "1"})


# aiohttp raises these itself (router, body limit); map each to an OpenAI-style code.
_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


def from_http(exc: web.HTTPException, request: web.Request) -> ApiError:
    if exc.status == 404:
        message = f"Invalid URL ({request.method} {request.path})"
    elif exc.status == 405:
        message = f"Method {request.method} is not allowed for {request.path}"
    else:
        message = exc.text or exc.reason
    keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    kind = INVALID if exc.status < 500 else "server_error"
    return ApiError(exc.status, message, kind, None, _HTTP_CODES.get(exc.status), keep)


def sse_error(err: ApiError) -> bytes:
    """An error after the stream's 200 headers went out: one SSE event carrying the schema."""
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n"
