"""Celery tasks. Thin: they take ids, call firmware/, record results, and are idempotent."""

from __future__ import annotations

import os
import socket
import time

from celery import shared_task
from flask import current_app


@shared_task(name="tinyfleet.ping", ignore_result=False)  # type: ignore[untyped-decorator]
def ping(payload: str = "ping") -> dict[str, object]:
    """Echo `payload` with the worker's host, pid and app name: proves a task round-trips."""
    return {
        "payload": payload,
        "worker": socket.gethostname(),
        "pid": os.getpid(),
        "app": current_app.name,  # only set inside the Flask app context
        "time": time.time(),
    }
