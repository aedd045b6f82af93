"""Prometheus metrics: GET /metrics (needs a viewer token, like the API).

Two kinds of figures, because the stack runs several processes (gunicorn workers, Celery
workers, the MQTT bridge):

- **Events** counted where they happen (HTTP requests and their latency; MQTT messages in,
  out and rejected; build and search durations) are prometheus-client counters and
  histograms in its *multiprocess mode*: each process writes its own memory-mapped files
  under `PROMETHEUS_MULTIPROC_DIR`, and a scrape sums them over every process. The stack
  gives all its processes `var/metrics` (emptied by `tinyfleet up`); a gunicorn started
  without the variable uses `<var>/metrics/web`, emptied when its master starts
  (`service.gunicorn_conf`, which also drops dead workers' live gauges). Without the
  variable (tests, the Flask dev server) the figures are this process's own.
- **State** (devices by state and MCU, devices online, jobs by state, each active
  campaign's jobs by state and its progress) is read from the database at scrape time
  (`GAUGE_SOURCES`), so it is right
  whichever process changed it and needs no bookkeeping. A source is a function of a
  session yielding metric families; a new table's figures are one more source
  (`gauge_source`).

- **The MQTT bridge's own counters** (`tinyfleet_bridge_*`: messages in, rejected by kind,
  blocks and commands out) live in its own registry, served on 127.0.0.1:BRIDGE_METRICS_PORT.
  When that setting is given (the stack gives a free port), a scrape of /metrics reads them
  from there (at most `BRIDGE_SCRAPE_TIMEOUT_S`) and appends them, with
  `tinyfleet_bridge_up` 1 or 0; one scrape target shows the whole stack.

The hooks for other processes are the metric objects below (`MQTT_MESSAGES`,
`BUILD_SECONDS`, `SEARCH_SECONDS`): import and `.inc()` / `.observe()` them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

from flask import Blueprint, Flask, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.auth import require
from service.db import request_session
from service.logs import install_request_context
from service.models import (
    ACTIVE_CAMPAIGN_STATES,
    Campaign,
    DeploymentJob,
    Device,
    Role,
)
from service.private_files import private_dir
from service.rollout import TERMINAL

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BRIDGE_SCRAPE_TIMEOUT_S = 0.5
# `*_created` series: not written in multiprocess mode, so not in-process either (one format).
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds. Pages and API calls are milliseconds; a bulk registration of 10,000 seconds.
HTTP_BUCKETS = (.005, .01, .025, .05, .1, .2, .5, 1.0, 2.5, 5.0, 10.0, 30.0)
WORK_BUCKETS = (.1, .5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

HTTP_REQUESTS = Counter(
    "tinyfleet_http_requests", "HTTP requests answered, by route and status",
    ["method", "endpoint", "status"])
HTTP_SECONDS = Histogram(
    "tinyfleet_http_request_duration_seconds", "Time to answer an HTTP request, by route",
    ["method", "endpoint"], buckets=HTTP_BUCKETS)
# Hooks for the MQTT bridge: direction "in" (device -> service) or "out"; outcome
# "accepted" or "rejected" (a malformed or unauthorised message, which is logged and dropped).
MQTT_MESSAGES = Counter(
    "tinyfleet_mqtt_messages", "MQTT messages, by direction, topic kind and outcome",
    ["direction", "kind", "outcome"])
# Hooks for the Celery workers: one observation per finished firmware build or search.
BUILD_SECONDS = Histogram(
    "tinyfleet_build_duration_seconds", "Firmware build time (compile, QEMU check, sign)",
    ["outcome"], buckets=WORK_BUCKETS)
SEARCH_SECONDS = Histogram(
    "tinyfleet_search_duration_seconds", "Architecture and schedule search time",
    ["outcome"], buckets=WORK_BUCKETS)

GaugeSource = Callable[[Session], Iterable[Metric]]
GAUGE_SOURCES: list[GaugeSource] = []


def gauge_source(source: GaugeSource) -> GaugeSource:
    """Decorator: read `source`'s metric families from the database at every scrape."""
    GAUGE_SOURCES.append(source)
    return source


@gauge_source
def devices_by_state(session: Session) -> Iterator[Metric]:
    """tinyfleet_devices{state, mcu}: registered devices; tinyfleet_devices_online{mcu}:
    those whose MQTT presence is online. One GROUP BY for both: `online` is in no index, so
    it reads the table once (57 ms at 100,000 devices here, against 13 + 100 ms for an
    index-only count and a separate scan)."""
    family = GaugeMetricFamily("tinyfleet_devices", "Registered devices by state and MCU",
                               labels=["state", "mcu"])
    online = GaugeMetricFamily("tinyfleet_devices_online",
                               "Devices online (their retained MQTT presence)", labels=["mcu"])
    by_mcu: dict[str, int] = {}
    rows = session.execute(select(Device.state, Device.mcu, func.count(),
                                  func.sum(case((Device.online.is_(True), 1), else_=0)))
                           .group_by(Device.mcu, Device.state))
    for state, mcu, count, up in rows:
        family.add_metric([state.value, mcu], count)
        by_mcu[mcu] = by_mcu.get(mcu, 0) + int(up or 0)
    for mcu, count in sorted(by_mcu.items()):
        if count:
            online.add_metric([mcu], count)
    yield family
    yield online


@gauge_source
def jobs_by_state(session: Session) -> Iterator[Metric]:
    """tinyfleet_jobs{state}: deployment jobs of every campaign, by state; and, for each
    active campaign, tinyfleet_campaign_jobs{campaign, state} and its progress (finished
    jobs / jobs)."""
    jobs = GaugeMetricFamily("tinyfleet_jobs", "Deployment jobs by state", labels=["state"])
    for state, count in session.execute(select(DeploymentJob.state, func.count())
                                        .group_by(DeploymentJob.state)):
        jobs.add_metric([state.value], count)
    yield jobs
    per = GaugeMetricFamily("tinyfleet_campaign_jobs", "Jobs of each active campaign by state",
                            labels=["campaign", "state"])
    progress = GaugeMetricFamily("tinyfleet_campaign_progress_ratio",
                                 "Finished jobs / jobs of each active campaign",
                                 labels=["campaign"])
    totals: dict[int, list[int]] = {}
    for campaign, state, count in session.execute(
            select(DeploymentJob.campaign_id, DeploymentJob.state, func.count())
            .join(Campaign, Campaign.id == DeploymentJob.campaign_id)
            .where(Campaign.state.in_(ACTIVE_CAMPAIGN_STATES))
            .group_by(DeploymentJob.campaign_id, DeploymentJob.state)):
        per.add_metric([str(campaign), state.value], count)
        done_all = totals.setdefault(campaign, [0, 0])
        done_all[0] += count if state in TERMINAL else 0
        done_all[1] += count
    for campaign, (done, total) in sorted(totals.items()):
        progress.add_metric([str(campaign)], done / total if total else 1.0)
    yield per
    yield progress


def bridge_exposition(port: int, timeout_s: float = BRIDGE_SCRAPE_TIMEOUT_S) -> bytes:
    """The MQTT bridge's counters from 127.0.0.1:`port`, then tinyfleet_bridge_up 1 or 0."""
    import urllib.request

    up_help = (b"# HELP tinyfleet_bridge_up 1 when the MQTT bridge's counters were read\n"
               b"# TYPE tinyfleet_bridge_up gauge\n")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=timeout_s) as answer:
            body: bytes = answer.read()
    except OSError:
        return up_help + b"tinyfleet_bridge_up 0.0\n"
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return body + up_help + b"tinyfleet_bridge_up 1.0\n"


class DatabaseCollector(Collector):
    """The state gauges, read with one session at scrape time."""

    def __init__(self, session: Session, sources: Iterable[GaugeSource]) -> None:
        self.session = session
        self.sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        """Every source's families."""
        for source in self.sources:
            yield from source(self.session)


def multiproc_dir() -> Path | None:
    """The multiprocess directory, when this process writes its figures there."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


# A process told to write there must find the directory (a missing one fails every request).
_GIVEN_DIR = multiproc_dir()
if _GIVEN_DIR is not None:
    private_dir(_GIVEN_DIR)


def prepare_multiproc_dir(path: Path) -> None:
    """An empty directory for a new set of processes (files of earlier runs would be summed)."""
    shutil.rmtree(path, ignore_errors=True)
    private_dir(path)


def exposition(session: Session, bridge_port: int = 0) -> bytes:
    """The text format of every metric: events (all processes'), database state, and the
    bridge's counters when `bridge_port` is given."""
    events = CollectorRegistry()
    if multiproc_dir() is not None:
        multiprocess.MultiProcessCollector(events)  # type: ignore[no-untyped-call]
    state = CollectorRegistry()
    state.register(DatabaseCollector(session, GAUGE_SOURCES))
    bridge = bridge_exposition(bridge_port) if bridge_port else b""
    return generate_latest(events if multiproc_dir() is not None else REGISTRY) \
        + generate_latest(state) + bridge


bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@require(Role.VIEWER)
def metrics_view() -> Response:
    """Prometheus text exposition."""
    port = int(current_app.config.get("BRIDGE_METRICS_PORT") or 0)
    return Response(exposition(request_session(), port), mimetype=CONTENT_TYPE_LATEST)


def _endpoint_label() -> str:
    # The route, not the path: one series per route whatever ids the paths carry.
    return request.endpoint or "unmatched"


def install_request_metrics(app: Flask) -> None:
    """Count and time every request of `app` (after the answer is shaped)."""

    def _start() -> None:
        g.metrics_started = time.perf_counter()

    # First of all: requests that an earlier hook refuses (413 ...) are counted too.
    app.before_request_funcs.setdefault(None, []).insert(0, _start)

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.pop("metrics_started", None)
        if started is not None:
            endpoint = _endpoint_label()
            HTTP_SECONDS.labels(request.method, endpoint).observe(time.perf_counter() - started)
            HTTP_REQUESTS.labels(request.method, endpoint, str(response.status_code)).inc()
        return response


@bp.record_once
def _install(state: BlueprintSetupState) -> None:
    app = cast(Flask, state.app)
    install_request_metrics(app)
    install_request_context(app)

