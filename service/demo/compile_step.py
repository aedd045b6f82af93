"""The demo's former compile step: one signed, QEMU-checked firmware image per hardware class,
in process. `tinyfleet demo` now builds through the queue (service/demo/campaign_steps.py);
this step stays for `bench.compiler`'s demo-model rows and as the in-process reference.

Devices with the same (core, SRAM, OTA slot) share one build, as campaigns will
(DESIGN, "Hardware class"). The model is a MobileNetV2 w0.35 at 144x144 with 10 classes and
random weights (no training in the demo): its layer-based peak (~290 kB) is more than some of
the sample devices have, so the planner picks patch-based schedules there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.demo.runner import DemoContext, DemoError

DEMO_WIDTH = 0.35
DEMO_RESOLUTION = 144
DEMO_CLASSES = 10


@dataclass(frozen=True)
class HardwareClass:
    """Devices that can run the same image."""

    fleet: str
    cpu: str
    sram_bytes: int
    flash_bytes: int
    ota_layout: str
    slot_bytes: int
    devices: tuple[str, ...]


def hardware_classes(devices: list[dict[str, Any]]) -> list[HardwareClass]:
    """Group API device records by fleet (its signing key), core, SRAM and Flash slot."""
    groups: dict[tuple[str, str, int, int, str, int], list[str]] = {}
    for d in devices:
        key = (d["fleet"], d["cpu"], d["sram_bytes"], d["flash_bytes"], d["ota_layout"],
               d["slot_bytes"])
        groups.setdefault(key, []).append(d["name"])
    return [HardwareClass(*key, devices=tuple(sorted(names)))
            for key, names in sorted(groups.items())]


def compile_step(ctx: DemoContext) -> None:
    """Plan, compile, run in QEMU and sign one image per hardware class of the fleet."""
    from firmware.arch import mobilenet_v2
    from firmware.errors import FirmwareError
    from firmware.frontend.builtin import build_graph
    from firmware.pipeline import CompileOptions, compile_model
    from firmware.targets import Cpu, OtaLayout, custom_target
    from service import db
    from service.fleets import get_fleet, load_signing_key

    graph = build_graph(mobilenet_v2(DEMO_WIDTH, DEMO_RESOLUTION, num_classes=DEMO_CLASSES))
    ctx.say(f"    model: {graph.name}, 10 classes, random weights")
    items = ctx.client.get("/api/v1/devices?limit=100")["items"]
    engine = db.make_engine(ctx.plan.database_url)
    built = 0
    try:
        session = db.make_sessionmaker(engine)()
        for hw in hardware_classes(items):
            label = f"{hw.cpu} {hw.sram_bytes // 1024} kB SRAM, {hw.slot_bytes // 1024} kB slot"
            target = custom_target(hw.sram_bytes, hw.flash_bytes, Cpu(hw.cpu), name=hw.cpu)
            layout = OtaLayout(hw.ota_layout)
            if target.slot_bytes(layout) != hw.slot_bytes:
                raise DemoError(f"{label}: the registry says a {hw.slot_bytes} B slot, the "
                                f"target gives {target.slot_bytes(layout)} B")
            if target.qemu_board is None:
                ctx.say(f"    {label} ({', '.join(hw.devices)}): skipped, no QEMU board "
                        f"emulates a {hw.cpu} to check the image on")
                continue
            fleet, _count = get_fleet(session, hw.fleet)
            out = ctx.var_dir / "firmware" / f"{hw.fleet}-{hw.cpu}-{hw.sram_bytes}-{hw.slot_bytes}"
            try:
                result = compile_model(graph, target, load_signing_key(fleet), out,
                                       options=CompileOptions(layout=layout,
                                                              onnx_check=False, test_vectors=2))
            except FirmwareError as exc:
                ctx.say(f"    {label} ({', '.join(hw.devices)}): does not fit: {exc}")
                continue
            (out / "firmware.img").write_bytes(result.image)
            built += 1
            ctx.say(f"    {label} ({', '.join(hw.devices)}): {_summary(result.report)}")
        session.close()
    finally:
        engine.dispose()
    if built == 0:
        raise DemoError("no hardware class of the sample fleet got an image")
    ctx.say(f"    images under {ctx.var_dir / 'firmware'}, signed with each fleet's key")


def _summary(report: Mapping[str, Any]) -> str:
    sched = report["schedule"]
    how = ("layer-based" if sched["patches"] == 1 else
           f"{sched['patches']}x{sched['patches']} patches to {sched['split_after']}")
    pred, meas = report["predicted"], report["measured"]
    return (f"{how}, SRAM {pred['sram_bytes'] / 1024:.1f} kB predicted (arena + scratch + "
            f"static + stack) / {meas['sram_bytes'] / 1024:.1f} kB measured, "
            f"Flash {meas['flash_bytes'] / 1024:.0f} kB, bit-exact in QEMU: {report['bit_exact']}")
