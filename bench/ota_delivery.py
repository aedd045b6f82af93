"""OTA delivery: N simulated devices take a signed image from offer to verified `installed`.

Real parts: a Mosquitto with the stack's generated config, the registry's device credentials
(bulk-registered through the REST API), the bridge (workers.bridge, in this process with a
sink that records arrival times; the offers go out through CommandPublisher, also here),
and reference clients (device_agent.reference_client) in `--procs` processes, each running
its devices on one selector thread. Every device gets the image of its class (5 MCU
classes), `--image-kb` kB each, signed with the fleet's key; each device checks every
block's CRC, the sha256 and the Ed25519 signature, keeps the image in memory as its slot,
and reports `installed`.

    .venv/bin/python -m bench.ota_delivery --devices 1000 --procs 4 [--json]

Measured from the first offer published to the last `installed` received by the sink:
devices per minute, offer-to-installed p50/p99 (all offers are published at once, so the
later devices wait behind the earlier ones), and CPU seconds of the broker, of this process
(bridge + publisher + sink), and of the simulators.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from device_agent import protocol as p

CLASSES = ("stm32f746", "stm32f412", "stm32h743", "nrf52840", "rp2040")


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (and its reaped children) in seconds, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    """CPU seconds used by this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the simulator processes ---------------------------------------------------------------


def simulate(conn: Connection, host: str, port: int, identities: list[tuple[str, str, str]],
             public_pem: bytes, window: int, profile: str | None = None) -> None:
    """One simulator process: connect its devices, report ready, run until told to stop."""
    raise_nofile()
    from device_agent.device_loop import DeviceLoop
    from device_agent.reference_client import DeviceIdentity, ReferenceDevice
    from firmware.image import load_public_key

    key = load_public_key(public_pem)
    devices = [ReferenceDevice(DeviceIdentity(d, pw, mcu), key, window=window,
                               progress_every=0.5) for d, pw, mcu in identities]
    loop = DeviceLoop(host, port)
    loop.add(devices)
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        run_loop = loop.run

        def profiled() -> None:
            profiler.enable()
            try:
                run_loop()
            finally:
                profiler.disable()
                profiler.dump_stats(profile)

        loop.run = profiled  # type: ignore[method-assign]
    loop.start()
    deadline = time.monotonic() + 120
    while not all(d.ready.is_set() for d in devices):
        if time.monotonic() > deadline:
            conn.send(("error", f"{sum(not d.ready.is_set() for d in devices)} devices "
                                "never subscribed"))
            return
        time.sleep(0.05)
    conn.send(("ready", len(devices)))
    assert conn.recv() == "go"
    cpu0 = self_cpu_s()
    assert conn.recv() == "stop"
    cpu = self_cpu_s() - cpu0
    states = Counter(o.state.value for d in devices for o in d.outcomes.values())
    crc = sum(len(d.crc_refusals) for d in devices)
    loop.stop()
    conn.send(("done", cpu, dict(states), crc))


# --- the bridge side -----------------------------------------------------------------------


@dataclass
class BenchSink:
    """Serves each device its class's artifact and records when each update ended."""

    assigned: dict[str, str]  # device id -> sha256
    ended: dict[str, tuple[float, str]] = field(default_factory=dict)
    all_ended: threading.Event = field(default_factory=threading.Event)
    expected: int = 0

    def on_event(self, device_id: str, event: p.DeviceEvent) -> None:
        if event.state.terminal and device_id not in self.ended:
            self.ended[device_id] = (time.monotonic(), event.state.value)
            if len(self.ended) >= self.expected:
                self.all_ended.set()

    def on_presence(self, device_id: str, online: bool,
                    backend: str | None = None) -> None:
        pass

    def on_metrics(self, device_id: str, report: p.MetricsReport) -> None:
        pass

    def artifact_for(self, device_id: str, update_id: str) -> str | None:
        return self.assigned.get(device_id)

    def pending_commands(self, device_id: str) -> Sequence[p.OtaOffer]:
        return ()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def profile_network_thread(client: Any, out: Path) -> None:
    """Run a paho client's network thread (where the bridge serves blocks) under cProfile."""
    import cProfile

    thread_main = client._thread_main

    def profiled() -> None:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            thread_main()
        finally:
            profiler.disable()
            profiler.dump_stats(str(out))

    client._thread_main = profiled


def run(devices: int, procs: int, image_kb: int, window: int, timeout_s: float,
        profile: Path | None = None, block_size: int = p.DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
    """One delivery run; the measurements as a dict."""
    from tests.ota_fleet import OtaFleet, signed_image
    from tests.servers import start_mosquitto
    from workers.artifacts import ArtifactStore
    from workers.bridge import Bridge, BrokerLogin, CommandPublisher

    nofile = raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-bench-ota-"))
    root.chmod(0o755)
    broker = start_mosquitto(root)
    children: list[tuple[mp.process.BaseProcess, Connection]] = []
    bridge = publisher = None
    try:
        fleet = OtaFleet(broker, root / "var")
        per_class = -(-devices // len(CLASSES))
        identities = []
        for mcu in CLASSES:
            n = min(per_class, devices - len(identities))
            identities += fleet.register(n, mcu, f"bench-{mcu}")
        key = fleet.signing_key()
        store = ArtifactStore(root / "var" / "artifacts")
        images = {mcu: signed_image(key, mcu, image_kb * 1024, seed=7) for mcu in CLASSES}
        shas = {mcu: store.put(image) for mcu, image in images.items()}
        offers = {mcu: p.make_offer(f"bench-{mcu}", image, block_size=block_size)
                  for mcu, image in images.items()}
        sink = BenchSink({d.device_id: shas[d.mcu] for d in identities}, expected=devices)
        login = BrokerLogin.from_config(fleet.config)
        bridge = Bridge(sink, store, login, block_size=block_size)
        if profile is not None:
            profile_network_thread(bridge.client, profile)
        bridge.start()
        publisher = CommandPublisher(login)

        from firmware.image import public_key_pem
        public_pem = public_key_pem(key.public_key())
        ctx = mp.get_context("spawn")
        for i in range(procs):
            mine = [(d.device_id, d.password, d.mcu) for d in identities[i::procs]]
            parent, child = ctx.Pipe()
            sim_profile = f"{profile}.sim{i}" if profile is not None and i == 0 else None
            proc = ctx.Process(target=simulate, args=(child, broker.host, broker.port, mine,
                                                      public_pem, window, sim_profile),
                               daemon=True)
            proc.start()
            children.append((proc, parent))
        for _proc, conn in children:
            message = conn.recv()
            if message[0] != "ready":
                raise RuntimeError(f"a simulator failed: {message[1]}")
        for _proc, conn in children:
            conn.send("go")
        broker_cpu0, self_cpu0 = proc_cpu_s(broker.proc.pid), self_cpu_s()
        offered: dict[str, float] = {}
        start = time.monotonic()
        batch = []
        for d in identities:
            offered[d.device_id] = time.monotonic()
            batch.append((d.device_id, offers[d.mcu]))
        publisher.publish_many(batch, timeout_s=60)
        finished = sink.all_ended.wait(timeout_s)
        end = max((t for t, _s in sink.ended.values()), default=time.monotonic())
        broker_cpu = proc_cpu_s(broker.proc.pid) - broker_cpu0
        bridge_cpu = self_cpu_s() - self_cpu0
        sim_cpu, states, crc = 0.0, Counter[str](), 0
        for _proc, conn in children:
            conn.send("stop")
            _, cpu, counts, refusals = conn.recv()
            sim_cpu += cpu
            states.update(counts)
            crc += refusals
        latencies = [t - offered[d] for d, (t, s) in sink.ended.items() if s == "installed"]
        wall = end - start
        installed = len(latencies)
        return {
            "devices": devices, "procs": procs, "image_bytes": image_kb * 1024,
            "block_size": block_size, "window_blocks": window, "nofile": nofile,
            "all_finished": finished, "installed": installed, "device_states": dict(states),
            "crc_refusals": crc, "wall_s": round(wall, 2),
            "devices_per_min": round(installed / wall * 60) if wall > 0 else 0,
            "offer_to_installed_p50_s": round(statistics.median(latencies), 2) if latencies
            else None,
            "offer_to_installed_p99_s": round(percentile(latencies, 0.99), 2) if latencies
            else None,
            "broker_cpu_s": round(broker_cpu, 2),
            "bridge_process_cpu_s": round(bridge_cpu, 2),
            "bridge_cpu_ms_per_device": round(bridge_cpu / max(installed, 1) * 1000, 2),
            "simulator_cpu_s": round(sim_cpu, 2),
            "blocks_sent": int(bridge.metrics.value("tinyfleet_bridge_blocks_sent")),
            "rejected": bridge.metrics.rejections(),
            "load_average": os.getloadavg(),
        }
    finally:
        for proc, _conn in children:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        if publisher is not None:
            publisher.close()
        if bridge is not None:
            bridge.stop()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4, help="simulator processes")
    parser.add_argument("--image-kb", type=int, default=200)
    parser.add_argument("--window", type=int, default=64, help="blocks a device asks ahead")
    parser.add_argument("--block-size", type=int, default=p.DEFAULT_BLOCK_SIZE)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", type=Path, help="cProfile stats of the bridge's network "
                        "thread to this file")
    args = parser.parse_args(argv)
    result = run(args.devices, args.procs, args.image_kb, args.window, args.timeout,
                 args.profile, args.block_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:28} {v}")
    return 0 if result["all_finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
