"""Grouping of devices into hardware classes (pure)."""

from __future__ import annotations

import pytest

from service.demo.compile_step import hardware_classes

pytestmark = pytest.mark.unit


def _dev(name: str, fleet: str = "f", cpu: str = "cortex-m4", sram: int = 262144,
         flash: int = 1048576, layout: str = "ab", slot: int = 507904) -> dict[str, object]:
    return {"name": name, "fleet": fleet, "cpu": cpu, "sram_bytes": sram, "flash_bytes": flash,
            "ota_layout": layout, "slot_bytes": slot}


def test_equal_hardware_shares_one_class_and_any_difference_splits_it() -> None:
    devices = [_dev("a"), _dev("b"), _dev("c", sram=131072), _dev("d", layout="single",
                                                                  slot=1015808),
               _dev("e", fleet="g"), _dev("f", cpu="cortex-m7")]
    classes = hardware_classes(devices)
    assert [c.devices for c in classes] == [("c",), ("a", "b"), ("d",), ("f",), ("e",)]
