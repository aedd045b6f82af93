"""Errors as `application/problem+json` (RFC 9457), each naming the fields at fault."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, request
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_MIME = "application/problem+json"
PROBLEM_BASE = "https://tinyfleet.dev/problems/"

# Titles for the statuses the API returns; `type` is derived from the title.
TITLES: dict[int, str] = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class FieldError:
    """One problem with one input field; `index` is the row of a bulk request."""

    field: str
    message: str
    index: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this error (without `index` when there is none)."""
        out: dict[str, Any] = {"field": self.field, "message": self.message}
        if self.index is not None:
            out["index"] = self.index
        return out


@dataclass
class ApiError(Exception):
    """An error the API reports as problem+json with `status`."""

    status: int
    detail: str
    errors: list[FieldError] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}"


def invalid(field_name: str, message: str, status: int = 422) -> ApiError:
    """An ApiError about one field, with the field in the detail."""
    return ApiError(status, f"{field_name}: {message}", [FieldError(field_name, message)])


def problem_body(status: int, detail: str, errors: list[FieldError] | None = None) -> bytes:
    """The JSON document of a problem (also for servers in front of the app)."""
    title = TITLES.get(status, "Error")
    body = {
        "type": PROBLEM_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "errors": [e.to_json() for e in errors or []],
    }
    return json.dumps(body).encode()


def problem_response(status: int, detail: str, errors: list[FieldError] | None = None,
                     headers: dict[str, str] | None = None) -> Response:
    """A problem+json response."""
    response = Response(problem_body(status, detail, errors), status=status,
                        mimetype=PROBLEM_MIME)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Turn ApiError, every HTTP error (unknown routes, 405, 413...) and database errors that
    input can cause into problem+json."""

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return problem_response(err.status, err.detail, err.errors, err.headers)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        detail = err.description or TITLES.get(status, "error")
        if status == 413:
            from service.limits import drain_body, too_large

            drain_body(request.environ)
            big = too_large(request.max_content_length)
            return problem_response(413, big.detail, big.errors)
        if status in (404, 405):
            detail = (f"no route {request.method} {request.path}" if status == 404 else
                      f"{request.method} is not allowed on {request.path}")
        response = problem_response(status, detail)
        if status == 405 and err.response is None:
            allow = getattr(err, "valid_methods", None)
            if allow:
                response.headers["Allow"] = ", ".join(allow)
        return response

    @app.errorhandler(IntegrityError)
    def _integrity_error(err: IntegrityError) -> Response:
        # A unique name taken by a concurrent request, or a row it deleted: a conflict.
        _rollback()
        field_name = conflict_field(err)
        detail = f"{field_name}: conflicts with a concurrent change; nothing was written"
        return problem_response(409, detail, [FieldError(field_name, "already taken or "
                                                         "changed concurrently")])

    @app.errorhandler(DataError)
    def _data_error(err: DataError) -> Response:
        # Validation should have caught this first: log it as a gap, answer the client.
        _rollback()
        log.error("database rejected a value that passed validation: %s", err.orig)
        return problem_response(422, "a value is out of range for the database",
                                [FieldError("body", "a value is out of range")])

    @app.errorhandler(OperationalError)
    def _operational_error(err: OperationalError) -> Response:
        _rollback()
        log.error("database unavailable or busy: %s", err.orig)
        return problem_response(503, "the database is busy or unavailable; retry shortly",
                                [FieldError("database", "busy or unavailable")],
                                {"Retry-After": "1"})


def _rollback() -> None:
    from flask import g

    session = g.get("db_session")
    if session is not None:
        session.rollback()


_KEY_RE = re.compile(r"Key \((?:lower\()?(\w+)")  # PostgreSQL: Key (name)=(x) ...
_SQLITE_RE = re.compile(r"constraint failed: \w+\.(\w+)")  # UNIQUE constraint failed: t.c


def conflict_field(err: IntegrityError) -> str:
    """The column an integrity error is about (`name` for a taken name), else 'body'."""
    text = str(err.orig)
    match = _KEY_RE.search(text) or _SQLITE_RE.search(text)
    return match[1] if match else "body"
