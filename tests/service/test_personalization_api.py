"""Personalization metrics at the service: validated again and stored per device and round,
served per device and as a fleet summary; starting a round enqueues its task."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from device_agent import protocol as p
from service.app import create_app
from service.personalization import next_round, record_metrics
from service.problems import ApiError
from tests.servers import RedisServer
from tests.service.conftest import Api, count_rows, fleet, make_tokens

GOOD: dict[str, Any] = {"round": 1, "samples_used": 320, "accuracy_before": 0.2,
                        "accuracy_after": 0.6, "loss_before": 2.1, "loss_after": 1.2,
                        "loss_curve": [2.0, 1.5, 1.2], "training_memory_bytes": 16840,
                        "duration_s": 3.2}


def _device(api: Api, name: str, mcu: str) -> str:
    response = api.post("/api/v1/devices", json={"name": name, "fleet": "greenhouse",
                                                 "mcu": mcu})
    assert response.status_code == 201, response.json
    return str(response.json["device"]["id"])


def _record(app: Flask, device_id: str, report: Any, version: str | None = "v1") -> bool:
    session = app.extensions["tinyfleet.sessionmaker"]()
    try:
        return record_metrics(session, device_id, report, version)
    finally:
        session.close()


def test_metrics_are_stored_once_per_round_and_summarized(api: Api, app: Flask) -> None:
    fleet(api)
    a, b = _device(api, "gh-1", "stm32f746"), _device(api, "gh-2", "stm32f746")
    c = _device(api, "gh-3", "rp2040")
    assert _record(app, a, GOOD)
    assert not _record(app, a, GOOD)  # a re-sent message (QoS 1) is stored once
    assert _record(app, a, p.encode(p.MetricsReport(**{**GOOD, "round": 2,
                                                       "accuracy_after": 0.5,
                                                       "accuracy_before": 0.6,
                                                       "loss_curve": ()})))
    assert _record(app, b, {**GOOD, "accuracy_before": 0.3, "accuracy_after": 0.4})
    assert _record(app, c, GOOD, version=None)
    rounds = api.get("/api/v1/devices/gh-1/metrics").json["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["loss_curve"] == [2.0, 1.5, 1.2] and rounds[0]["kept"]
    assert not rounds[1]["kept"] and rounds[1]["accuracy_gain"] == pytest.approx(-0.1)
    groups = api.get("/api/v1/personalization").json["groups"]
    by = {(g["mcu"], g["model_version"]): g for g in groups}
    f7 = by[("stm32f746", "v1")]
    assert (f7["devices"], f7["rounds"], f7["rolled_back"]) == (2, 3, 1)
    assert f7["mean_accuracy_before"] == pytest.approx((0.2 + 0.6 + 0.3) / 3)
    assert by[("rp2040", None)]["mean_gain"] == pytest.approx(0.4)
    assert api.get("/api/v1/devices/nobody/metrics").status_code == 404


@pytest.mark.parametrize("bad", [{"labels": [1, 2, 3]}, {"accuracy_after": 2.0},
                                 {"round": "1"}, {"loss_curve": [0.5] * 51}])
def test_anything_off_the_allow_list_is_refused_and_not_stored(api: Api, app: Flask,
                                                               bad: dict[str, Any]) -> None:
    fleet(api)
    device = _device(api, "gh-1", "stm32f746")
    with pytest.raises(ApiError) as info:
        _record(app, device, {**GOOD, **bad})
    assert info.value.status == 422 and next(iter(bad)) in info.value.detail
    assert count_rows(app, "device_metrics") == 0


def test_round_numbers_are_handed_out_once_even_when_commands_cross(api: Api,
                                                                   app: Flask) -> None:
    fleet(api)
    device = _device(api, "gh-1", "stm32f746")
    maker = app.extensions["tinyfleet.sessionmaker"]

    def start(requested: int | None = None) -> int:
        session = maker()
        try:
            return next_round(session, device, requested)
        finally:
            session.close()

    # Two commands before the first round's metrics came back: two rounds, two numbers (the
    # device answers a number it has run with that round's metrics again).
    assert [start(), start()] == [1, 2]
    with ThreadPoolExecutor(4) as pool:  # at once, each in its own session
        handed = list(pool.map(lambda _: start(), range(12)))
    assert sorted(handed) == list(range(3, 15))
    _record(app, device, {**GOOD, "round": 40})  # a round the device ran on its own schedule
    assert start() == 41
    assert start(100) == 100 and start() == 101  # an operator's number raises the counter
    assert start(7) == 7 and start() == 102  # a re-sent old number does not lower it


def test_personalize_validates_and_enqueues(api: Api, app: Flask, tmp_path: Path,
                                            redis_server: RedisServer, db_url: str) -> None:
    fleet(api)
    device = _device(api, "gh-1", "stm32f746")
    assert api.post("/api/v1/devices/gh-1/personalize", json={}).status_code == 503  # no queue
    queued = create_app({"DATABASE_URL": db_url, "VAR_DIR": str(tmp_path / "var2"),
                         "AUTO_MIGRATE": False, "REDIS_URL": redis_server.url})
    api2 = Api(queued.test_client(), make_tokens(queued))
    bad = api2.post("/api/v1/devices/gh-1/personalize", json={"scheme": {"bias_layers": -1}})
    assert bad.status_code == 422 and "scheme: format" in bad.json["detail"]
    assert api2.post("/api/v1/devices/gh-1/personalize",
                     json={"round": -1}).status_code == 422
    _record(app, device, GOOD)
    started = api2.post("/api/v1/devices/gh-1/personalize", json={})
    assert started.status_code == 202, started.json
    assert started.json["round"] == 2  # one past the last reported
    client = redis.Redis.from_url(redis_server.url)
    messages = [json.loads(m) for m in client.lrange("celery", 0, -1)]
    tasks = [(m["headers"]["task"], json.loads(__import__("base64").b64decode(m["body"]))[0])
             for m in messages]
    assert ("tinyfleet.personalize", [device, 2, None]) in tasks
    client.delete("celery")
    queued.extensions["tinyfleet.engine"].dispose()


def test_cli_metrics_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from click.testing import CliRunner

    from service.cli import main

    for key in list(os.environ):
        if key.startswith("TINYFLEET_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TINYFLEET_VAR_DIR", str(tmp_path / "var"))

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    src = tmp_path / "d.csv"
    src.write_text("name,mcu\ns-1,stm32f746\n")
    assert run("devices", "import", str(src), "--fleet", "lab", "--create-fleet").exit_code == 0
    app = create_app({"VAR_DIR": str(tmp_path / "var")})
    session = app.extensions["tinyfleet.sessionmaker"]()
    from service.registry import find_device

    device_id = find_device(session, "s-1").id
    session.close()
    _record(app, device_id, GOOD)
    app.extensions["tinyfleet.engine"].dispose()
    out = run("personalize", "metrics", "s-1", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["rounds"][0]["round"] == 1
    table = run("personalize", "metrics", "s-1").stdout
    assert "+40.0 pt" in table
    summary = json.loads(run("personalize", "summary", "--json").stdout)
    assert summary["groups"][0]["devices"] == 1
    refused = run("personalize", "start", "s-1", "--json")
    assert refused.exit_code == 1 and "task queue" in refused.stdout
