"""The Celery client the service uses to enqueue work by task name (it never imports workers/).

The worker (workers/celery_app.py) configures its Celery app with the same `celery_settings`,
so both sides agree on the broker, the result backend and the serializer.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from flask import Flask, current_app


def celery_settings(redis_url: str | None, visibility_timeout_s: int = 3600) -> dict[str, Any]:
    """Celery settings for a Redis broker and result backend at `redis_url`.

    Redis returns a task a worker took but never acknowledged (its process was killed)
    only after `visibility_timeout_s`: long enough for the longest task (a build), since a
    task still running past it is delivered twice (ours are idempotent). The reconciler
    (workers.tasks.reconcile, every RECONCILE_INTERVAL_S) re-enqueues a job stuck past
    STUCK_AFTER_S long before that, so a lost task costs minutes, not the hour.
    """
    if not redis_url:
        raise RuntimeError(
            "TINYFLEET_REDIS_URL is not set: Celery needs Redis (run `tinyfleet up`, or set "
            "TINYFLEET_REDIS_URL=redis://HOST:PORT/0)"
        )
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 3600,
        # A task lost with a crashed worker is redelivered; our tasks are idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"socket_connect_timeout": 2.0,
                                     "visibility_timeout": visibility_timeout_s},
        "redis_socket_connect_timeout": 2.0,
    }


def celery_client(app: Flask | None = None) -> Celery:
    """The app's Celery client (created on first use; the worker's own app when it runs inside)."""
    app = app or current_app
    client = app.extensions.get("celery")
    if client is None:
        client = Celery(app.name)
        client.conf.update(celery_settings(app.config.get("REDIS_URL"),
                                           int(app.config.get("VISIBILITY_TIMEOUT_S", 3600))))
        app.extensions["celery"] = client
    return client


def enqueue(name: str, args: list[Any]) -> None:
    """Send task `name` with `args` (the service enqueues by name, never importing workers).

    503 when no task queue is configured; rows already committed are picked up by the
    reconciler once one is.
    """
    from service.problems import ApiError, FieldError

    if not current_app.config.get("REDIS_URL"):
        raise ApiError(503, "no task queue: TINYFLEET_REDIS_URL is not set (run `tinyfleet up`)",
                       [FieldError("queue", "not configured")])
    celery_client().send_task(name, args=args)
