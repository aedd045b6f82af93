"""Request size limits answered as problem+json: URIs over 4 kB (414) and bodies over a
per-route limit (413).

A body over its limit is read to the end and thrown away (up to DRAIN_MAX_BYTES, within
DRAIN_TIMEOUT_S) before the 413 is sent: a server that answers and closes while the client
is still uploading resets the connection, and the client sees a broken pipe instead of the
answer. The default limit is the `MAX_CONTENT_LENGTH` setting; a route with another limit
says so with `@body_limit(...)`, in bytes or as the name of a setting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flask import Flask, current_app, request

from service.problems import ApiError, FieldError, problem_body

F = TypeVar("F", bound=Callable[..., Any])

MAX_URI_BYTES = 4096
DRAIN_MAX_BYTES = 1 << 30
DRAIN_TIMEOUT_S = 30.0
_CHUNK = 1 << 16


def body_limit(limit: int | str) -> Callable[[F], F]:
    """View decorator: this route's body limit, in bytes or as a setting's name."""
    def decorator(view: F) -> F:
        view.max_body_bytes = limit  # type: ignore[attr-defined]
        return view

    return decorator


def route_body_limit(app: Flask, endpoint: str | None) -> int | None:
    """The body limit of `endpoint` (its @body_limit, else MAX_CONTENT_LENGTH)."""
    view = app.view_functions.get(endpoint or "")
    limit = getattr(view, "max_body_bytes", None)
    if isinstance(limit, str):
        limit = app.config[limit]
    if limit is None:
        limit = app.config.get("MAX_CONTENT_LENGTH")
    return None if limit is None else int(limit)


def drain_body(environ: dict[str, Any]) -> None:
    """Read and drop what is left of the request body (bounded), so the answer arrives."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    left = DRAIN_MAX_BYTES
    try:
        while left > 0 and time.monotonic() < deadline:
            chunk = stream.read(min(_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
    except (OSError, ValueError):  # the client went away, or the stream is closed
        return


def too_large(limit: int | None) -> ApiError:
    """The 413 for a body over `limit` bytes."""
    message = f"request body larger than the limit of {limit} bytes for this route"
    return ApiError(413, message, [FieldError("body", message)])


def read_body() -> bytes:
    """The request body, within the route's limit; 413 (after draining) beyond it.

    A body without Content-Length (chunked) is cut at the limit by werkzeug without an
    error: one more byte tells whether anything was left out.
    """
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if limit is not None and len(raw) >= limit and request.content_length is None:
        stream = request.environ.get("wsgi.input")
        if stream is not None and stream.read(1):
            drain_body(request.environ)
            raise too_large(limit)
    return raw


def check_body_size() -> None:
    """before_request: apply the route's body limit; 413 at once when Content-Length is over."""
    limit = route_body_limit(current_app, request.endpoint)
    request.max_content_length = limit
    length = request.content_length
    if limit is not None and length is not None and length > limit:
        drain_body(request.environ)
        raise too_large(limit)


class UriLimit:
    """WSGI middleware: a request URI over MAX_URI_BYTES gets a problem+json 414."""

    def __init__(self, app: Callable[..., Iterable[bytes]], max_bytes: int = MAX_URI_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if raw is None:
            query = environ.get("QUERY_STRING", "")
            raw = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "") + (
                "?" + query if query else "")
        size = len(raw.encode("latin-1", "replace")) if isinstance(raw, str) else len(raw)
        if size <= self.max_bytes:
            return self.app(environ, start_response)
        drain_body(environ)
        message = f"the request URI is {size} bytes long; the limit is {self.max_bytes}"
        body = problem_body(414, message, [FieldError("uri", message)])
        start_response("414 URI Too Long", [("Content-Type", "application/problem+json"),
                                            ("Content-Length", str(len(body)))])
        return [body]


def install(app: Flask) -> None:
    """Wire the limits into `app`."""
    app.before_request(check_body_size)
    app.wsgi_app = UriLimit(app.wsgi_app)  # type: ignore[method-assign]
