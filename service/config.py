"""Service settings: defaults, then `TINYFLEET_*` environment variables, then explicit values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Every setting the service reads, with its default. Paths are relative to the working
# directory, which is the repository root for `tinyfleet up` and `make demo`.
DEFAULTS: dict[str, Any] = {
    "VAR_DIR": "var",
    "DATABASE_URL": None,  # None: sqlite file VAR_DIR/tinyfleet.db
    "BROKER_DIR": None,  # None: VAR_DIR/broker
    "MOSQUITTO_PID_FILE": None,  # None: BROKER_DIR/mosquitto.pid; SIGHUP after a change
    "REDIS_URL": None,
    "MQTT_URL": None,  # mqtt://host:port; sets MQTT_HOST/MQTT_PORT unless they are given
    "MQTT_HOST": "127.0.0.1",
    "MQTT_PORT": 18883,  # the port `tinyfleet up` gives its Mosquitto
    "AUTO_MIGRATE": True,  # run Alembic migrations when the app starts
    "SYNC_BROKER_FILES": True,  # regenerate Mosquitto's password file and ACL on change
    "MAX_CONTENT_LENGTH": 32 * 1024 * 1024,  # 10,000 bulk rows are about 2 MB of JSON
    "OTA_BLOCK_SIZE": 4096,  # bytes of image per OTA block frame (workers/bridge.py)
    "BRIDGE_METRICS_PORT": 0,  # the bridge's Prometheus counters on 127.0.0.1:PORT; 0: off
    # OTA campaigns (service.campaigns, workers.tasks)
    "MODEL_UPLOAD_MAX_BYTES": 256 * 1024 * 1024,  # POST /api/v1/models bodies
    "SEARCH_POPULATION": 48,  # the per-class search's size (firmware.deploy.SearchSettings)
    "SEARCH_GENERATIONS": 15,
    "ANALYSIS": "default",  # contribution analysis settings: default | quick
    "RECONCILE_INTERVAL_S": 10,  # Celery beat runs the reconciler this often
    "STUCK_AFTER_S": 300,  # a job waiting this long for its task is re-enqueued
    "LEASE_S": 60,  # a plan/build claim lasts this long unless its worker renews it
    "VISIBILITY_TIMEOUT_S": 3600,  # Redis: an unacknowledged task returns after this
    "SECRET_KEY": None,  # signs dashboard sessions; None: VAR_DIR/dashboard-secret (made once)
}

_INT_KEYS = {"MQTT_PORT", "MAX_CONTENT_LENGTH", "OTA_BLOCK_SIZE", "BRIDGE_METRICS_PORT",
             "MODEL_UPLOAD_MAX_BYTES", "SEARCH_POPULATION", "SEARCH_GENERATIONS",
             "RECONCILE_INTERVAL_S", "STUCK_AFTER_S", "LEASE_S", "VISIBILITY_TIMEOUT_S"}
_BOOL_KEYS = {"AUTO_MIGRATE", "SYNC_BROKER_FILES"}
ENV_PREFIX = "TINYFLEET_"


def _from_env(key: str, raw: str) -> Any:
    if key in _INT_KEYS:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{key}={raw!r} is not an integer") from None
    if key in _BOOL_KEYS:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw


def load_config(overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings from defaults, then TINYFLEET_* variables, then `overrides`; paths resolved."""
    env = os.environ if environ is None else environ
    config = dict(DEFAULTS)
    for key in DEFAULTS:
        if ENV_PREFIX + key in env:
            config[key] = _from_env(key, env[ENV_PREFIX + key])
    explicit = {k for k in DEFAULTS if ENV_PREFIX + k in env} | set(overrides or {})
    config.update(overrides or {})
    if config["MQTT_URL"]:
        url = urlsplit(str(config["MQTT_URL"]))
        if url.scheme not in ("mqtt", "tcp") or not url.hostname:
            raise ValueError(f"MQTT_URL {config['MQTT_URL']!r} is not mqtt://host[:port]")
        if "MQTT_HOST" not in explicit:
            config["MQTT_HOST"] = url.hostname
        if "MQTT_PORT" not in explicit:
            config["MQTT_PORT"] = url.port or 1883
    var_dir = Path(config["VAR_DIR"])
    config["VAR_DIR"] = str(var_dir)
    if not config["DATABASE_URL"]:
        config["DATABASE_URL"] = f"sqlite:///{(var_dir / 'tinyfleet.db').resolve()}"
    if not config["BROKER_DIR"]:
        config["BROKER_DIR"] = str(var_dir / "broker")
    if not config["MOSQUITTO_PID_FILE"]:
        # Where `tinyfleet up` keeps its broker's pid: CLI changes (devices import,
        # decommission) reload the running broker too. No file there: nothing is signalled.
        config["MOSQUITTO_PID_FILE"] = str(Path(config["BROKER_DIR"]) / "mosquitto.pid")
    return config
