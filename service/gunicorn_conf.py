"""gunicorn settings of the service (`gunicorn --config python:service.gunicorn_conf ...`).

gunicorn refuses some requests before the app sees them (a request line over its limit,
too many or too long headers, a malformed request) and answers those in HTML. Its sync
worker is subclassed here to answer them as problem+json, like every other error of the API.
The request line limit is gunicorn's largest, so that URIs of 4-8 kB reach the app, which
answers them itself (service.limits: 414 over 4096 bytes).

Logs are JSON lines (service.logs) on stderr, gunicorn's own error log included; its access
log stays as configured (the stack: var/log/web-access.log). Metrics are summed over the
workers by prometheus-client's multiprocess mode (service.metrics): its directory is set
here, before any worker imports prometheus_client, to `<TINYFLEET_VAR_DIR>/metrics/web`
(emptied when the master starts) unless PROMETHEUS_MULTIPROC_DIR names one already.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gunicorn import util
from gunicorn.http import errors
from gunicorn.workers.sync import SyncWorker

from service import logs as _logs
from service.problems import TITLES, FieldError, problem_body

worker_class = "service.gunicorn_conf.ProblemSyncWorker"
limit_request_line = 8190  # gunicorn's maximum
# gunicorn >= 25 opens a control socket in ~/.gunicorn by default, one path for every
# gunicorn of the user: two stacks (or test servers) would fight over it. Nothing uses it.
control_socket_disable = True
logconfig_dict = _logs.logconfig()

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWN_METRICS_DIR = _MULTIPROC_ENV not in os.environ
if _OWN_METRICS_DIR:
    os.environ[_MULTIPROC_ENV] = str(
        (Path(os.environ.get("TINYFLEET_VAR_DIR", "var")) / "metrics" / "web").resolve())


def on_starting(_server: Any) -> None:
    """An empty metrics directory for this master's workers (earlier runs' counts go)."""
    if _OWN_METRICS_DIR:
        import shutil

        from service.private_files import private_dir

        shutil.rmtree(os.environ[_MULTIPROC_ENV], ignore_errors=True)
        private_dir(Path(os.environ[_MULTIPROC_ENV]))


def child_exit(_server: Any, worker: Any) -> None:
    """A worker is gone: drop its live gauges (its counters stay in the sums). Light
    imports only: this runs in the master, also while the stack is being stopped."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

# gunicorn's refusals: (status, the part of the request at fault).
_REFUSALS: list[tuple[type[Exception], int, str]] = [
    (errors.LimitRequestLine, 414, "uri"),
    (errors.LimitRequestHeaders, 431, "headers"),
    (errors.InvalidRequestLine, 400, "request line"),
    (errors.InvalidRequestMethod, 400, "method"),
    (errors.InvalidHTTPVersion, 400, "HTTP version"),
    (errors.InvalidHeaderName, 400, "headers"),
    (errors.InvalidHeader, 400, "headers"),
    (errors.InvalidChunkSize, 400, "body"),
    (errors.ChunkMissingTerminator, 400, "body"),
]


def refusal(exc: BaseException) -> tuple[int, str] | None:
    """(status, field) of a request gunicorn refused, None for any other error."""
    if isinstance(exc, errors.InvalidResponseHeader | errors.InvalidResponseHeaderName):
        return None  # the application's fault, not the client's: gunicorn's own 500
    for cls, status, field in _REFUSALS:
        if isinstance(exc, cls):
            return status, field
    return None


class ProblemSyncWorker(SyncWorker):  # type: ignore[misc]
    """gunicorn's sync worker, answering the requests it refuses as problem+json."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """problem+json for a refused request; gunicorn's own handling for anything else."""
        found = refusal(exc)
        if found is None:
            super().handle_error(req, client, addr, exc)
            return
        status, field = found
        detail = f"{field}: {exc}" if str(exc) else f"{field}: refused"
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        body = problem_body(status, detail, [FieldError(field, str(exc) or "refused")])
        head = (f"HTTP/1.1 {status} {TITLES.get(status, 'Error')}\r\nConnection: close\r\n"
                f"Content-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            util.write_nonblock(client, head.encode("latin-1") + body)
        except OSError:
            self.log.debug("failed to send the refusal")
