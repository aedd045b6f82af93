"""`tinyfleet onnx-ops`: the ONNX operators `plan` and `compile` import, and those they refuse."""

from __future__ import annotations

import textwrap

import click

from service.cli.context import echo_json
from service.cli.ui import print_table

FOLDING = ("A node of a refused operator is still accepted when all its inputs are constants "
           "(evaluated at import by onnx's reference implementation), except the random ones.")


@click.command("onnx-ops")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def onnx_ops(as_json: bool) -> None:
    """List the ONNX operators the importer supports (and on what conditions) and refuses."""
    from firmware.frontend.onnx_ops import SUPPORTED_OPS, refused_ops

    refused = refused_ops()
    if as_json:
        echo_json({"supported": dict(SUPPORTED_OPS), "refused": refused, "note": FOLDING})
        return
    click.echo("Supported (anything outside these conditions is refused, naming the node):")
    print_table(["OP", "CONDITIONS"], [[op, text] for op, text in SUPPORTED_OPS.items()])
    click.echo(f"\nRefused ({len(refused)} standard operators):")
    click.echo(textwrap.fill(", ".join(refused), width=100))
    click.echo("\n" + textwrap.fill(FOLDING, width=100))
