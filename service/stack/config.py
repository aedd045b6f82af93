"""What the local stack starts, on which ports, and the settings its processes receive."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from service.private_files import read_or_create_secret

# Next to, never on, the standard ports of a system Redis (6379) and Mosquitto (1883).
DEFAULT_REDIS_PORT = 16379
DEFAULT_MQTT_PORT = 18883
DEFAULT_HTTP_PORT = 8080
LOOPBACK = "127.0.0.1"


class StackError(Exception):
    """The local stack cannot start or stop; the message names the component and the value."""


class Component(StrEnum):
    """A part of the stack, as named in the state file and in /healthz."""

    REDIS = "redis"
    MQTT = "mqtt"
    DATABASE = "database"
    WEB = "web"
    WORKER = "worker"


@dataclass(frozen=True)
class StackPlan:
    """The resolved stack: own servers to start (port set) or external ones to use (URL set)."""

    var_dir: Path
    http_port: int
    redis_url: str
    own_redis_port: int | None
    mqtt_host: str
    mqtt_port: int
    own_mqtt: bool
    database_url: str
    own_redis_password: str | None = None  # requirepass of our own Redis (in its URL too)
    worker_concurrency: int = 1
    web_workers: int = 2
    host: str = LOOPBACK
    inherit_settings: bool = True  # pass other TINYFLEET_* variables on to the service
    # The MQTT bridge's own Prometheus counters on 127.0.0.1 (0: off); /metrics includes them.
    bridge_metrics_port: int = 0
    # Service settings the caller gives every process (name without TINYFLEET_, value).
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def broker_dir(self) -> Path:
        """Where the registry writes Mosquitto's password file and ACL."""
        return broker_dir_for(self.var_dir)

    @property
    def mosquitto_pid_file(self) -> Path:
        """The pid file of our own Mosquitto; the registry sends SIGHUP there after a sync."""
        return mosquitto_pid_file_for(self.var_dir)

    @property
    def log_dir(self) -> Path:
        """One log file per component lives here."""
        return self.var_dir / "log"

    @property
    def metrics_dir(self) -> Path:
        """prometheus-client's multiprocess files of every process of the stack."""
        return self.var_dir / "metrics"

    @property
    def state_file(self) -> Path:
        """The pids of a running stack, read by `tinyfleet down`."""
        return self.var_dir / "stack.json"

    @property
    def http_url(self) -> str:
        """Base URL of the service behind the WSGI server."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def mqtt_url(self) -> str:
        """The broker as an mqtt:// URL."""
        return f"mqtt://{self.mqtt_host}:{self.mqtt_port}"

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The environment of the service and worker processes: `base` plus the stack's URLs."""
        env = {k: v for k, v in base.items()
               if self.inherit_settings or not k.startswith("TINYFLEET_")}
        env.update(
            TINYFLEET_VAR_DIR=str(self.var_dir),
            TINYFLEET_DATABASE_URL=self.database_url,
            TINYFLEET_REDIS_URL=self.redis_url,
            TINYFLEET_MQTT_URL=self.mqtt_url,
            TINYFLEET_MQTT_HOST=self.mqtt_host,
            TINYFLEET_MQTT_PORT=str(self.mqtt_port),
            TINYFLEET_BROKER_DIR=str(self.broker_dir),
            # One metrics directory for the web workers, Celery and the bridge: a scrape of
            # /metrics sums every process's counters (service.metrics; emptied by `up`).
            PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir),
        )
        env.update({f"TINYFLEET_{name}": value for name, value in self.settings})
        if self.bridge_metrics_port:
            env["TINYFLEET_BRIDGE_METRICS_PORT"] = str(self.bridge_metrics_port)
        if self.own_mqtt:
            env["TINYFLEET_MOSQUITTO_PID_FILE"] = str(self.mosquitto_pid_file)
        else:
            env.pop("TINYFLEET_MOSQUITTO_PID_FILE", None)
        return env


def redis_password_for(var_dir: Path) -> str:
    """The password of the stack's own Redis, created on first use (URL-safe, 0600)."""
    return read_or_create_secret(var_dir / "redis" / "password")


def broker_dir_for(var_dir: Path) -> Path:
    """The broker directory under a var dir (the service's BROKER_DIR default too)."""
    return var_dir / "broker"


def mosquitto_pid_file_for(var_dir: Path) -> Path:
    """Our Mosquitto's pid file under a var dir (the service's MOSQUITTO_PID_FILE default)."""
    return broker_dir_for(var_dir) / "mosquitto.pid"


def plan_stack(
    var_dir: Path,
    *,
    redis_port: int = DEFAULT_REDIS_PORT,
    mqtt_port: int = DEFAULT_MQTT_PORT,
    http_port: int = DEFAULT_HTTP_PORT,
    environ: Mapping[str, str] | None = None,
    worker_concurrency: int = 1,
    inherit_settings: bool = True,
    bridge_metrics_port: int | None = None,
    settings: Mapping[str, str] | None = None,
) -> StackPlan:
    """Resolve the stack from options and `TINYFLEET_*` settings (which win over own servers).

    The bridge's metrics port: `bridge_metrics_port`, else TINYFLEET_BRIDGE_METRICS_PORT, else
    a free port on loopback (0 turns the bridge's exporter off).
    """
    env = os.environ if environ is None else environ
    var_dir = var_dir.resolve()
    for name, port in (("--redis-port", redis_port), ("--mqtt-port", mqtt_port),
                       ("--http-port", http_port)):
        if not 1 <= port <= 65535:
            raise StackError(f"{name} {port} is not a TCP port (1..65535)")
    redis_url = env.get("TINYFLEET_REDIS_URL") or None
    mqtt_host, mqtt_port_ext = _external_mqtt(env)
    database_url = env.get("TINYFLEET_DATABASE_URL") or f"sqlite:///{var_dir / 'tinyfleet.db'}"
    # Our own Redis gets a generated password (var/redis/password, 0600): anything on the
    # host could otherwise reach the queue on loopback and enqueue work.
    redis_password = None if redis_url else redis_password_for(var_dir)
    if bridge_metrics_port is None:
        given = env.get("TINYFLEET_BRIDGE_METRICS_PORT", "")
        if given and not (given.isdigit() and int(given) <= 65535):
            raise StackError(f"TINYFLEET_BRIDGE_METRICS_PORT {given!r} is not a TCP port "
                             "(1..65535, or 0: off)")
        bridge_metrics_port = int(given) if given else free_port()
    return StackPlan(
        var_dir=var_dir,
        http_port=http_port,
        redis_url=redis_url or f"redis://:{redis_password}@{LOOPBACK}:{redis_port}/0",
        own_redis_port=None if redis_url else redis_port,
        own_redis_password=redis_password,
        mqtt_host=mqtt_host or LOOPBACK,
        mqtt_port=mqtt_port_ext or mqtt_port,
        own_mqtt=mqtt_host is None,
        database_url=database_url,
        worker_concurrency=worker_concurrency,
        inherit_settings=inherit_settings,
        bridge_metrics_port=bridge_metrics_port,
        settings=tuple(sorted((settings or {}).items())),
    )


def _external_mqtt(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    """(host, port) of a broker given by TINYFLEET_MQTT_URL or _HOST/_PORT; (None, None) if none."""
    url = env.get("TINYFLEET_MQTT_URL")
    if url:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise StackError(f"TINYFLEET_MQTT_URL {url!r} is not mqtt://HOST[:PORT]")
        return parts.hostname, parts.port or 1883
    host = env.get("TINYFLEET_MQTT_HOST")
    if not host:
        return None, None
    port_text = env.get("TINYFLEET_MQTT_PORT", "1883")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise StackError(f"TINYFLEET_MQTT_PORT {port_text!r} is not a TCP port (1..65535)")
    return host, int(port_text)


def redact_url(url: str) -> str:
    """`url` without its password (for logs, state files and /healthz)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    host = parts.hostname or ""
    netloc = f"{user}{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def ensure_port_free(port: int, what: str, option: str, host: str = LOOPBACK) -> None:
    """Raise StackError naming `what`, the port and the option to change it if the port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free, as it is for them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise StackError(
                f"{what} port {port} on {host} is already in use; choose another with {option}"
            ) from exc


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
