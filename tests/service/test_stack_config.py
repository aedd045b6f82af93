"""The stack's plan (own servers or TINYFLEET_* ones) and its generated Mosquitto config."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.stack.config import (
    DEFAULT_MQTT_PORT,
    DEFAULT_REDIS_PORT,
    StackError,
    ensure_port_free,
    plan_stack,
    redact_url,
)
from service.stack.mosquitto import MosquittoFiles, render_mosquitto_conf

pytestmark = pytest.mark.unit


def test_defaults_start_our_own_servers_off_the_system_ports(tmp_path: Path) -> None:
    plan = plan_stack(tmp_path, environ={})
    assert (plan.own_redis_port, plan.own_mqtt) == (DEFAULT_REDIS_PORT, True)
    assert {DEFAULT_REDIS_PORT, DEFAULT_MQTT_PORT}.isdisjoint({6379, 1883})
    assert plan.database_url == f"sqlite:///{tmp_path.resolve() / 'tinyfleet.db'}"
    env = plan.child_env({"TINYFLEET_MOSQUITTO_PID_FILE": "stale"})
    assert env["TINYFLEET_MOSQUITTO_PID_FILE"] == str(plan.broker_dir / "mosquitto.pid")
    assert env["TINYFLEET_MQTT_PORT"] == str(DEFAULT_MQTT_PORT)
    user = {"TINYFLEET_SYNC_BROKER_FILES": "0", "PATH": "/bin"}
    assert plan.child_env(user)["TINYFLEET_SYNC_BROKER_FILES"] == "0"
    isolated = plan_stack(tmp_path, environ={}, inherit_settings=False).child_env(user)
    assert "TINYFLEET_SYNC_BROKER_FILES" not in isolated and isolated["PATH"] == "/bin"


def test_tinyfleet_settings_replace_our_servers(tmp_path: Path) -> None:
    plan = plan_stack(tmp_path, environ={
        "TINYFLEET_REDIS_URL": "redis://queue.example:6380/2",
        "TINYFLEET_MQTT_URL": "mqtt://broker.example:8883",
        "TINYFLEET_DATABASE_URL": "postgresql://fleet@db/fleet"})
    assert plan.own_redis_port is None and not plan.own_mqtt
    assert (plan.redis_url, plan.mqtt_host, plan.mqtt_port) == (
        "redis://queue.example:6380/2", "broker.example", 8883)
    assert plan.database_url == "postgresql://fleet@db/fleet"
    # No pid file of ours: an external broker is reloaded by whoever runs it.
    assert "TINYFLEET_MOSQUITTO_PID_FILE" not in plan.child_env({})
    by_host = plan_stack(tmp_path, environ={"TINYFLEET_MQTT_HOST": "10.0.0.5"})
    assert (by_host.mqtt_host, by_host.mqtt_port, by_host.own_mqtt) == ("10.0.0.5", 1883, False)


@pytest.mark.parametrize(("environ", "options", "named"), [
    ({"TINYFLEET_MQTT_URL": "http://x:1"}, {}, "TINYFLEET_MQTT_URL"),
    ({"TINYFLEET_MQTT_HOST": "h", "TINYFLEET_MQTT_PORT": "70000"}, {}, "TINYFLEET_MQTT_PORT"),
    ({}, {"http_port": 0}, "--http-port 0"),
])
def test_bad_settings_name_the_setting(tmp_path: Path, environ: dict[str, str],
                                       options: dict[str, int], named: str) -> None:
    with pytest.raises(StackError, match=named):
        plan_stack(tmp_path, environ=environ, **options)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@q.example:6380/0", "redis://:***@q.example:6380/0"),
    ("postgresql://fleet:s3cret@db/fleet", "postgresql://fleet:***@db/fleet"),
    ("redis://127.0.0.1:16379/0", "redis://127.0.0.1:16379/0"),
    ("sqlite:////var/lib/tinyfleet/tinyfleet.db", "sqlite:////var/lib/tinyfleet/tinyfleet.db"),
])
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_taken_port_is_refused_with_its_number() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(StackError, match=f"Redis port {port} on 127.0.0.1 .* --redis-port"):
            ensure_port_free(port, "Redis", "--redis-port")


def test_mosquitto_conf_denies_anonymous_and_listens_on_loopback_only(tmp_path: Path) -> None:
    files = MosquittoFiles.in_dir(tmp_path / "broker")
    conf = render_mosquitto_conf(files, 18883).splitlines()
    assert "allow_anonymous false" in conf
    # Loopback TCP for devices, a Unix socket in the broker dir for the service: nothing else.
    assert [line for line in conf if line.startswith("listener")] == [
        "listener 18883 127.0.0.1", f"listener 0 {files.socket_file}"]
    assert f"password_file {files.password_file}" in conf
    assert f"acl_file {files.acl_file}" in conf
    assert f"pid_file {files.pid_file}" in conf


def test_the_bridge_gets_a_metrics_port_and_callers_give_settings(tmp_path: Path) -> None:
    plan = plan_stack(tmp_path, environ={}, settings={"SEARCH_POPULATION": "12"})
    env = plan.child_env({})
    assert 1024 <= plan.bridge_metrics_port <= 65535  # a free one on loopback
    assert env["TINYFLEET_BRIDGE_METRICS_PORT"] == str(plan.bridge_metrics_port)
    assert env["TINYFLEET_SEARCH_POPULATION"] == "12"
    chosen = plan_stack(tmp_path, environ={"TINYFLEET_BRIDGE_METRICS_PORT": "19555"})
    assert chosen.child_env({})["TINYFLEET_BRIDGE_METRICS_PORT"] == "19555"
    off = plan_stack(tmp_path, environ={}, bridge_metrics_port=0)
    assert "TINYFLEET_BRIDGE_METRICS_PORT" not in off.child_env({})
    with pytest.raises(StackError, match="TINYFLEET_BRIDGE_METRICS_PORT 'x' is not a TCP port"):
        plan_stack(tmp_path, environ={"TINYFLEET_BRIDGE_METRICS_PORT": "x"})
