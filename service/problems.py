"""Errors as `application/problem+json` (RFC 9457), each naming the fields at fault."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException

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
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
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


def problem_response(status: int, detail: str, errors: list[FieldError] | None = None,
                     headers: dict[str, str] | None = None) -> Response:
    """A problem+json response."""
    title = TITLES.get(status, "Error")
    body = {
        "type": PROBLEM_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "errors": [e.to_json() for e in errors or []],
    }
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_MIME)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Turn ApiError and every HTTP error (unknown routes, 405, 413...) into problem+json."""

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return problem_response(err.status, err.detail, err.errors, err.headers)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        detail = err.description or TITLES.get(status, "error")
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            detail = f"request body larger than the limit of {limit} bytes"
            return problem_response(413, detail, [FieldError("body", detail)])
        if status in (404, 405):
            from flask import request

            detail = (f"no route {request.method} {request.path}" if status == 404 else
                      f"{request.method} is not allowed on {request.path}")
        response = problem_response(status, detail)
        if status == 405 and err.response is None:
            allow = getattr(err, "valid_methods", None)
            if allow:
                response.headers["Allow"] = ", ".join(allow)
        return response
