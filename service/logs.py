"""Structured logs: one JSON object per line, carrying the ids of what is being worked on.

Every record gets `ts`, `level`, `logger`, `message`, the ids bound in the current context
(`request_id`, `device_id`, `campaign_id`, `job_id`, `task_id`: whichever are set) and any
`extra={...}` fields of the call. Ids are bound with `bind(...)` (a context manager on a
contextvar, so threads and requests never see each other's) and web requests bind their own
(`install_request_context`). Processes opt in with `configure_json_logging()`: gunicorn does
through `service.gunicorn_conf.logconfig_dict`, a Celery worker or the MQTT bridge by calling
it at start (and `bind(task_id=...)` around a task).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any

from flask import Flask, Response, g, request

# The ids a record may carry, in the order they are written.
CONTEXT_IDS = ("request_id", "device_id", "campaign_id", "job_id", "task_id")
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")  # a caller's id is kept only if sane

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("tinyfleet_log_context", default=_EMPTY)

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}

access_log = logging.getLogger("tinyfleet.access")


def current_ids() -> dict[str, str]:
    """The ids bound in this context."""
    return dict(_context.get())


@contextlib.contextmanager
def bind(**ids: str | int | None) -> Iterator[None]:
    """Add ids (None: left out) to every record logged inside the block."""
    unknown = set(ids) - set(CONTEXT_IDS)
    if unknown:
        raise ValueError(f"unknown log context ids {sorted(unknown)}; known: {CONTEXT_IDS}")
    merged = {**_context.get(), **{k: str(v) for k, v in ids.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time (UTC, ISO 8601), level, logger, message, bound ids,
    `extra` fields, and the traceback as `exc_info` text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line of `record`."""
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(_context.get())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_json_logging(stream: IO[str] | None = None, level: int = logging.INFO) -> None:
    """Send every logger's records to `stream` (stderr) as JSON lines; idempotent."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)


def logconfig(level: str = "INFO") -> dict[str, Any]:
    """A logging.config.dictConfig document: everything as JSON lines on stderr (gunicorn's
    `logconfig_dict`, so that its own error log is JSON too)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json",
               "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"console": handler},
        "root": {"level": level, "handlers": ["console"]},
        "loggers": {
            # gunicorn's access logger is left alone: it keeps its own file, if any.
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True},
        },
    }


def _request_id() -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _device_of_request() -> str | None:
    # Routes about one device name it `key` (an id, or a name that the view resolves).
    args = request.view_args or {}
    key = args.get("key")
    return str(key) if key is not None and request.blueprint in ("devices", "dashboard") \
        else None


def install_request_context(app: Flask) -> None:
    """Bind a request id (the caller's X-Request-ID when sane, else a new one) and the
    device a route names to every record of a request; echo the id; log one access line."""

    def _bind() -> None:
        g.log_context = bind(request_id=_request_id(), device_id=_device_of_request())
        g.log_context.__enter__()
        g.log_started = time.perf_counter()

    # First of all: a request that an earlier hook refuses (413 ...) is logged with its id.
    app.before_request_funcs.setdefault(None, []).insert(0, _bind)

    @app.after_request
    def _access(response: Response) -> Response:
        ids = current_ids()
        if "request_id" in ids:
            response.headers.setdefault(REQUEST_ID_HEADER, ids["request_id"])
        started = g.get("log_started")
        if started is not None:
            access_log.info("%s %s %s", request.method, request.path, response.status_code,
                            extra={"method": request.method, "path": request.path,
                                   "endpoint": request.endpoint, "status": response.status_code,
                                   "duration_ms": round((time.perf_counter() - started) * 1e3,
                                                        2)})
        return response

    @app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        context = g.pop("log_context", None)
        if context is not None:
            context.__exit__(None, None, None)
