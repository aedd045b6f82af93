"""Tables and progress bars of the CLI (rich), one style for every command.

Tables go to stdout: plain text (no colour, natural width, no wrapping) when stdout is not a
terminal, so that pipes and tests read stable columns. Progress bars go to stderr and only
to a terminal: `--json` output and logs stay clean.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import click
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

PLAIN_WIDTH = 10_000  # wide enough that no table is wrapped


def make_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
               right: set[int] | frozenset[int] = frozenset()) -> Table:
    """A table in the house style: a header, a rule under it, no borders."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  header_style="bold")
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: set[int] | frozenset[int] = frozenset()) -> str:
    """The table as plain text (lines right-stripped)."""
    buffer = io.StringIO()
    Console(file=buffer, width=PLAIN_WIDTH, color_system=None, force_terminal=False,
            highlight=False).print(make_table(headers, rows, right))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                right: set[int] | frozenset[int] = frozenset()) -> None:
    """Print a table to stdout (styled on a terminal, plain text otherwise)."""
    if sys.stdout.isatty():
        table = make_table(headers, rows, right)
        console = Console(file=sys.stdout, highlight=False)
        # Never shrink a table to the terminal (ids would be cut with an ellipsis): a
        # wider one wraps as plain text does.
        natural = Measurement.get(console, console.options.update(width=PLAIN_WIDTH),
                                  table).maximum
        console.width = max(console.width, natural)
        console.print(table)
    else:
        click.echo(render_table(headers, rows, right))


def _stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False)


def stderr_is_terminal() -> bool:
    """Whether progress bars are shown (stderr is a terminal)."""
    return _stderr_console().is_terminal


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr; yields `update(completed, total=None, label=None)`.

    With total None the bar is a spinner with the elapsed time (work of unknown length).
    """
    console = _stderr_console()
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=total)

        def update(completed: float, total: float | None = None,
                   label: str | None = None) -> None:
            progress.update(task, completed=completed, total=total, description=label)

        yield update
