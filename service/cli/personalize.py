"""`tinyfleet personalize start|metrics|summary`: on-device personalization from the CLI."""

from __future__ import annotations

from typing import Any

import click

from service.cli.context import app_session, echo_json, fail
from service.cli.ui import print_table
from service.models import DeviceState
from service.personalization import device_metrics, fleet_summary, next_round
from service.problems import ApiError
from service.registry import find_device

PERSONALIZE_TASK = "tinyfleet.personalize"


@click.group()
def personalize() -> None:
    """Start personalization rounds and read their metrics (numbers only)."""


@personalize.command("start")
@click.argument("keys", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def start_cmd(keys: tuple[str, ...], as_json: bool) -> None:
    """Send a `personalize` command to devices KEYS (ids or names); each answers with
    metrics. Needs the task queue (`tinyfleet up`)."""
    from service.queue import celery_client

    started: list[dict[str, Any]] = []
    with app_session() as (app, session):
        try:
            devices = [find_device(session, key) for key in keys]
            off = [d.id for d in devices if d.state is not DeviceState.ACTIVE]
            if off:
                raise ApiError(409, f"decommissioned: {', '.join(off)}")
            if not app.config.get("REDIS_URL"):
                raise ApiError(503, "the task queue is not configured (TINYFLEET_REDIS_URL): "
                                    "run `tinyfleet up`, or set it")
        except ApiError as err:
            fail(err, as_json)
        client = celery_client(app)
        for device in devices:
            round_id = next_round(session, device.id)
            task = client.send_task(PERSONALIZE_TASK, args=[device.id, round_id, None])
            started.append({"device": device.id, "round": round_id, "task_id": task.id})
    if as_json:
        echo_json({"started": started})
        return
    for s in started:
        click.echo(f"round {s['round']} sent to {s['device']}")


@personalize.command("metrics")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def metrics_cmd(key: str, as_json: bool) -> None:
    """The rounds device KEY reported."""
    with app_session() as (_app, session):
        try:
            data = device_metrics(session, find_device(session, key))
        except ApiError as err:
            fail(err, as_json)
    if as_json:
        echo_json(data)
        return
    print_table(["ROUND", "SAMPLES", "BEFORE", "AFTER", "GAIN", "KEPT", "MEMORY", "SECONDS"],
                [[str(r["round"]), str(r["samples_used"]),
                  f"{100 * r['accuracy_before']:.1f} %", f"{100 * r['accuracy_after']:.1f} %",
                  f"{100 * r['accuracy_gain']:+.1f} pt", "yes" if r["kept"] else "no",
                  f"{r['training_memory_bytes'] / 1024:.1f} kB", f"{r['duration_s']:.1f}"]
                 for r in data["rounds"]], right={0, 1, 2, 3, 4, 6, 7})


@personalize.command("summary")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def summary_cmd(as_json: bool) -> None:
    """Personalization by MCU class and model version."""
    with app_session() as (_app, session):
        data = fleet_summary(session)
    if as_json:
        echo_json(data)
        return
    print_table(["MCU", "MODEL VERSION", "DEVICES", "ROUNDS", "ROLLED BACK", "BEFORE", "AFTER",
                 "GAIN"],
                [[g["mcu"], g["model_version"] or "-", str(g["devices"]), str(g["rounds"]),
                  str(g["rolled_back"]), f"{100 * g['mean_accuracy_before']:.1f} %",
                  f"{100 * g['mean_accuracy_after']:.1f} %", f"{100 * g['mean_gain']:+.1f} pt"]
                 for g in data["groups"]], right={2, 3, 4, 5, 6, 7})
