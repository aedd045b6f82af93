"""The local stack: tinyfleet's own Redis, Mosquitto, WSGI server and Celery worker under var/.

`plan_stack` decides what to start (settings given in `TINYFLEET_*` replace our own servers),
`start_stack` starts it and records the pids in a state file, `stop_stack` stops it again.
"""

from __future__ import annotations

from service.stack.config import (
    DEFAULT_HTTP_PORT,
    DEFAULT_MQTT_PORT,
    DEFAULT_REDIS_PORT,
    Component,
    StackError,
    StackPlan,
    plan_stack,
)
from service.stack.runner import RunningStack, start_stack, stop_stack

__all__ = [
    "DEFAULT_HTTP_PORT",
    "DEFAULT_MQTT_PORT",
    "DEFAULT_REDIS_PORT",
    "Component",
    "RunningStack",
    "StackError",
    "StackPlan",
    "plan_stack",
    "start_stack",
    "stop_stack",
]
