"""The Celery app of the worker: `celery -A workers.celery_app worker`.

As in Flask's examples/celery: tasks are `@shared_task`s and each runs inside the Flask app's
context, so they use the service's database sessions and settings (TINYFLEET_* environment).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.signals import setup_logging, worker_init
from flask import Flask

from service import logs
from service.app import create_app
from service.queue import celery_settings


def celery_init_app(app: Flask) -> Celery:
    """A Celery app configured from `app`'s REDIS_URL whose tasks run in `app`'s context."""

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            # Every log line of a task carries its id (service.logs).
            with app.app_context(), logs.bind(task_id=self.request.id):
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask)
    celery.conf.update(celery_settings(app.config.get("REDIS_URL"),
                                       int(app.config["VISIBILITY_TIMEOUT_S"])))
    # The reconciler, run by `celery beat` (a process of its own under `tinyfleet up`).
    celery.conf.beat_schedule = {"reconcile": {
        "task": "tinyfleet.reconcile", "schedule": float(app.config["RECONCILE_INTERVAL_S"])}}
    celery.conf.include = ["workers.tasks"]
    celery.set_default()
    app.extensions["celery"] = celery
    return celery


@worker_init.connect  # type: ignore[untyped-decorator]
def _preload(**_kwargs: Any) -> None:
    """Import the compiler and the search in the main process, before the pool forks: each
    pool process then starts its first plan or build at once instead of importing torch."""
    import firmware.deploy
    import firmware.nas.specialize
    import firmware.pipeline  # noqa: F401


@setup_logging.connect  # type: ignore[untyped-decorator]
def _json_logs(**_kwargs: Any) -> None:
    """The worker's logs as JSON lines, like the web server's (Celery keeps its hands off)."""
    logs.configure_json_logging()


flask_app = create_app()
celery_app = celery_init_app(flask_app)
app = celery_app  # `celery -A workers.celery_app` looks for `app` or `celery_app`
