"""`tinyfleet mcus`: the MCU catalog as a table or JSON."""

from __future__ import annotations

import click

from firmware.targets import CATALOG, KIB
from service.api.common import mcu_json
from service.cli.context import echo_json
from service.cli.ui import print_table


def _kib(n: int) -> str:
    return f"{n // KIB} kB" if n < 10 * 1024 * KIB else f"{n // (1024 * KIB)} MB"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def mcus(as_json: bool) -> None:
    """List the MCUs devices can be registered with (kB = 1024 bytes)."""
    items = [mcu_json(CATALOG[name]) for name in sorted(CATALOG)]
    if as_json:
        echo_json({"items": items})
        return
    rows = [[m["name"], m["vendor"], m["cpu"], f"{m['clock_hz'] // 1_000_000} MHz",
             _kib(m["sram_bytes"]), _kib(m["flash_bytes"]), _kib(m["slot_bytes_ab"]),
             "yes" if m["fpu"] else "no", "yes" if m["dsp"] else "no",
             m["qemu_board"] or "-"] for m in items]
    print_table(["NAME", "VENDOR", "CORE", "CLOCK", "SRAM", "FLASH", "A/B SLOT", "FPU", "DSP",
                 "QEMU"], rows, right={3, 4, 5, 6})
