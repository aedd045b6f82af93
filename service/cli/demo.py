"""`tinyfleet demo`: what `make demo` runs (see service/demo)."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import click

from service.demo import STEPS, DemoError, run_demo
from service.demo.api import ApiCallError
from service.stack import StackError


@click.command()
@click.option("--var", "var_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("var/demo"), show_default=True,
              help="The demo's own stack directory (emptied at the start).")
@click.option("--once", is_flag=True,
              help="Stop at the end instead of keeping the stack and dashboard running.")
@click.option("--family", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="A trained model family to use instead of the cached one.")
def demo(var_dir: Path, once: bool, family: Path | None) -> None:
    """The whole system: a stack, a fleet of simulated devices, a campaign through the
    queue and the MQTT bridge, a personalization round, a summary, the dashboard."""
    # Ctrl-C and SIGTERM stop the devices and the stack: also when our parent started us
    # with SIGINT ignored (a shell's `cmd &`), and when a supervisor or CI sends SIGTERM
    # (its default action would leave the stack's processes running).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_demo(var_dir, STEPS, {"once": once,
                                  "family": family.resolve() if family else None})
    except (DemoError, StackError, ApiCallError) as exc:
        raise click.ClickException(f"demo failed: {exc}") from exc
    except KeyboardInterrupt:
        raise click.ClickException("demo interrupted; the stack is stopped") from None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
