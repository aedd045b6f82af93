"""The Celery app against a real Redis and a real worker process (no eager mode)."""

from __future__ import annotations

import os

import pytest
from celery import Celery

from service.queue import celery_settings
from tests.servers import CeleryWorker


@pytest.mark.integration
def test_ping_task_round_trips_through_the_worker_inside_the_app_context(
        celery_worker: CeleryWorker) -> None:
    client = Celery("test-client")
    client.conf.update(celery_settings(celery_worker.redis_url))
    try:
        result = client.send_task("tinyfleet.ping", args=["hello"]).get(timeout=30)
    finally:
        client.close()
    assert result["payload"] == "hello"
    assert result["app"] == "service"  # current_app resolved: the task ran in the app context
    assert result["pid"] not in (os.getpid(), celery_worker.proc.pid)  # a pool process ran it


@pytest.mark.unit
def test_celery_settings_refuse_a_missing_redis_url() -> None:
    with pytest.raises(RuntimeError, match="TINYFLEET_REDIS_URL"):
        celery_settings(None)


@pytest.mark.integration
def test_the_worker_logs_json_lines(celery_worker: CeleryWorker) -> None:
    import json
    import time
    from pathlib import Path

    client = Celery("test-client")
    client.conf.update(celery_settings(celery_worker.redis_url))
    try:
        result = client.send_task("tinyfleet.ping", args=["log me"])
        result.get(timeout=30)
    finally:
        client.close()
    log = Path(celery_worker.env["TINYFLEET_VAR_DIR"]) / "log" / "worker.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [x for x in log.read_text().splitlines() if x.startswith("{")]
        docs = [json.loads(x) for x in lines]  # every log line is one JSON object
        if any(result.id in d["message"] for d in docs):
            break
        time.sleep(0.2)
    mentioned = [d for d in docs if result.id in d["message"]]
    assert mentioned and all(d["level"] in ("info", "warning") for d in mentioned)
    assert all({"ts", "level", "logger", "message"} <= set(d) for d in docs)
