"""`tinyfleet demo` (what `make demo` runs): the main job, as a list of named steps.

Each step takes the shared `DemoContext` and adds what later steps need. Later issues extend
the demo (models, campaigns, on-device personalization) by appending steps to `STEPS`.
The stack is always stopped at the end, also when a step fails or on Ctrl-C.
"""

from __future__ import annotations

from service.demo.runner import DemoContext, DemoError, Step, run_demo
from service.demo.steps import STEPS

__all__ = ["STEPS", "DemoContext", "DemoError", "Step", "run_demo"]
