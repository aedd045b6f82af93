"""`tinyfleet demo`: what `make demo` runs (see service/demo)."""

from __future__ import annotations

from pathlib import Path

import click

from service.demo import STEPS, DemoError, run_demo
from service.demo.api import ApiCallError
from service.stack import StackError


@click.command()
@click.option("--var", "var_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("var/demo"), show_default=True,
              help="The demo's own stack directory (emptied at the start).")
def demo(var_dir: Path) -> None:
    """Start a stack, register a sample fleet over the API, bring a device online, stop."""
    try:
        run_demo(var_dir, STEPS)
    except (DemoError, StackError, ApiCallError) as exc:
        raise click.ClickException(f"demo failed: {exc}") from exc
    except KeyboardInterrupt:
        raise click.ClickException("demo interrupted; the stack is stopped") from None
