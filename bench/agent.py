"""Device agent benchmark: personalization gain per round, install time, agent memory and
CPU (idle, during a round), and how many simulated agents one machine holds.

Run: .venv/bin/python -m bench.agent rounds|install|memory|scale|process|all [--agents 50,200]
     .venv/bin/python -m bench.agent host-build   (a class build with and without its host
     library: what the campaigns build job pays for host-backend devices)

`process` measures real `tinyfleet-agent --simulate N` processes (what a device or a gateway
runs): RSS and CPU idle, then during one personalization round sent over MQTT (the
service account publishes `personalize` to device 0 and waits for its metrics). Each
device's data is written beforehand (a device has its own; --simulate would otherwise make
it from the digits with scikit-learn and scipy, which the agent itself does not load).
Model: the checked-in digits TinyNet (tests/firmware/training/fixture_model, 16x16, int8)
compiled for an STM32F746 with the sparse-update scheme of tests/device_agent/images.py
(classifier + biases of the last 3 convs + head weights on 1/2 of its input channels), its
firmware (qemu backend) and host library (host backend). Data: each device's shifted slice of
the digits (`firmware.data.device_slice`). The broker is a project-started Mosquitto with a
registry (tests/ota_fleet.py), as in the OTA tests.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from device_agent.backends import make_backend, self_test
from device_agent.local_data import write_device_data
from device_agent.personalization import Personalizer
from device_agent.profile import BackendKind, DeviceProfile
from device_agent.slots import SlotStore
from tests.device_agent.images import Images, build_images, resign


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _provisioned(root: Path, images: Images, backend: str, index: int) -> Personalizer:
    device = DeviceProfile.for_mcu(f"bench-{index}", "stm32f746", backend)
    store = SlotStore(root / "slots", device, images.key.public_key())
    b = make_backend(device)
    image = images.mcu if backend == "qemu" else images.host
    store.install("u1", image, lambda slot, img: self_test(b, slot, img))
    write_device_data(root / "data", index)
    return Personalizer(store, b, root / "data")


def rounds(images: Images, work: Path, devices: int = 3, per_device: int = 3) -> None:
    """Accuracy before/after each round, 3 devices x 3 rounds (host backend)."""
    print("| device | round | samples | accuracy before | after | gain | kept | s |")
    print("|---|---|---|---|---|---|---|---|")
    gains = []
    for index in range(devices):
        p = _provisioned(work / f"r{index}", images, "host", index)
        for r in range(1, per_device + 1):
            res = p.run_round(r, seed=r)
            m = res.metrics
            gains.append(m.accuracy_after - m.accuracy_before)
            print(f"| {index} | {r} | {m.samples_used} | {100 * m.accuracy_before:.1f} % | "
                  f"{100 * m.accuracy_after:.1f} % | {100 * gains[-1]:+.1f} pt | "
                  f"{'yes' if res.kept else 'no'} | {m.duration_s:.1f} |")
    print(f"training memory (model figure): {m.training_memory_bytes} B")


def install(images: Images, work: Path, repeats: int = 20) -> None:
    """A 200 kB signed image through the slot store; the real self-tests per backend."""
    from tests.ota_fleet import signed_image

    big = signed_image(images.key, "stm32f746", 200 * 1024)
    # tests/ota_fleet.signed_image links for half the Flash (512 kB): a device with such slots
    device = DeviceProfile("bench", "stm32f746", "cortex-m7", 320 * 1024, 1024 * 1024,
                           512 * 1024, BackendKind.QEMU)
    times = []
    for i in range(repeats):
        store = SlotStore(work / f"i{i}", device, images.key.public_key())
        t0 = time.perf_counter()
        store.install(f"u{i}", big, lambda slot, img: None)  # read-back only: no model in it
        times.append(time.perf_counter() - t0)
    print(f"install of a {len(big)} B image (verify, journal, write, fsync, switch; no "
          f"self-test): median {1000 * statistics.median(times):.1f} ms, "
          f"max {1000 * max(times):.1f} ms over {repeats}")
    for backend, image in (("host", images.host), ("qemu", images.mcu)):
        dev = DeviceProfile.for_mcu("bench", "stm32f746", backend)
        b = make_backend(dev)
        t = []
        for i in range(5):
            store = SlotStore(work / f"{backend}{i}", dev, images.key.public_key())
            t0 = time.perf_counter()
            store.install("u", image, lambda slot, img, b=b: self_test(b, slot, img))
            t.append(time.perf_counter() - t0)
        print(f"install + self-test ({len(image)} B image, {backend} backend): median "
              f"{1000 * statistics.median(t):.0f} ms")


def _fleet(work: Path) -> Any:
    from tests.ota_fleet import OtaFleet
    from tests.servers import start_mosquitto

    broker_root = Path(tempfile.mkdtemp(prefix="tinyfleet-bench-mqtt-"))
    broker_root.chmod(0o755)
    broker = start_mosquitto(broker_root)
    return OtaFleet(broker, work / "var"), broker, broker_root


def _agents(fleet: Any, images: Images, work: Path, n: int, template: Path) -> list[Any]:
    from device_agent.agent import DeviceAgent
    from device_agent.config import AgentConfig, render_config
    from firmware.image import public_key_pem

    key = fleet.signing_key()
    pem = public_key_pem(key.public_key()).decode()
    agents = []
    for identity in fleet.register(n, "stm32f746", f"sim{n}-{time.time_ns()}"):
        base = work / identity.device_id
        shutil.copytree(template, base / "slots")
        (base / "agent.toml").write_text(render_config(
            device_id=identity.device_id, password=identity.password, mcu="stm32f746",
            backend="host", broker_host=fleet.broker.host, broker_port=fleet.broker.port,
            data_dir="data", slot_dir="slots", public_key_pem=pem))
        agents.append(DeviceAgent(AgentConfig.load(base / "agent.toml")))
    return agents


def _template(fleet: Any, images: Images, work: Path) -> Path:
    key = fleet.signing_key()
    image = resign(images.host, key)
    device = DeviceProfile.for_mcu("template", "stm32f746", "host")
    store = SlotStore(work / "template", device, key.public_key())
    b = make_backend(device)
    store.install("u1", image, lambda slot, img: self_test(b, slot, img))
    return work / "template"


def memory_and_scale(images: Images, work: Path, counts: list[int], idle_s: float) -> None:
    """RSS and CPU of agents in one process: idle, during a round, N agents."""
    from device_agent.loop import AgentLoop

    fleet, broker, root = _fleet(work)
    try:
        template = _template(fleet, images, work)
        base_rss = _rss_kb()
        for n in counts:
            before = _rss_kb()
            agents = _agents(fleet, images, work / f"n{n}", n, template)
            loop = AgentLoop(fleet.broker.host, fleet.broker.port, seed=1)
            t0 = time.perf_counter()
            loop.add(agents)
            loop.start()
            while not all(a.ready.is_set() for a in agents):
                time.sleep(0.05)
            connect_s = time.perf_counter() - t0
            time.sleep(1.0)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            time.sleep(idle_s)
            cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            rss = _rss_kb()
            print(f"| {n} | {connect_s:.1f} s | {(rss - before) / n:.0f} kB | "
                  f"{rss / 1024:.0f} MB | {100 * cpu:.1f} % |")
            if n == counts[0]:
                agent = agents[0]
                write_device_data(agent.config.data_dir, 0)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                result = agent.personalizer.run_round(1)
                wall = time.perf_counter() - wall0
                cpu_round = (time.process_time() - cpu0) / wall
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0
                m = result.metrics
                print(f"round on agent 0: {wall:.1f} s wall, CPU {100 * cpu_round:.0f} % of one "
                      f"core, peak RSS +{peak} kB, accuracy {100 * m.accuracy_before:.1f} -> "
                      f"{100 * m.accuracy_after:.1f} %")
            loop.stop()
        print(f"process RSS before any agent: {base_rss / 1024:.0f} MB")
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def _proc_stat(pid: int) -> tuple[int, int, float]:
    """(VmRSS kB, VmHWM kB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    kb = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
          if line.startswith(("VmRSS:", "VmHWM:"))}
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return kb["VmRSS"], kb["VmHWM"], (int(fields[11]) + int(fields[12])) / os.sysconf(
        "SC_CLK_TCK")


def agent_process(images: Images, work: Path, counts: list[int], idle_s: float) -> None:
    """`tinyfleet-agent --simulate N` as its own process: RSS and CPU idle and in a round."""
    import subprocess
    import sys
    import threading

    from device_agent import protocol as p
    from device_agent.config import render_config
    from firmware.image import public_key_pem
    from workers.bridge import BrokerLogin

    fleet, broker, root = _fleet(work)
    try:
        template = _template(fleet, images, work)
        pem = public_key_pem(fleet.signing_key().public_key()).decode()
        login = BrokerLogin.from_config(fleet.config)
        seen: dict[str, set[str]] = {"online": set(), "metrics": set()}
        lock = threading.Lock()
        client = login.client(f"bench-agent-{time.time_ns()}")

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            topic = p.parse_topic(msg.topic)
            with lock:
                if topic.channel is p.Channel.PRESENCE and bytes(msg.payload) == p.ONLINE:
                    seen["online"].add(topic.device_id)
                elif topic.channel is p.Channel.METRICS:
                    seen["metrics"].add(topic.device_id)

        client.on_connect = lambda c, *_a: c.subscribe(
            [("tinyfleet/v1/+/presence", 1), ("tinyfleet/v1/+/metrics", 1)])
        client.on_message = on_message
        login.endpoint.connect(client)
        client.loop_start()
        print("| agents | start to all online | process RSS idle | RSS per extra agent | "
              "CPU idle (of one core) | round: wall | round: CPU | round: peak RSS |")
        print("|---|---|---|---|---|---|---|---|")
        first_rss = None
        for n in counts:
            conf = work / f"proc{n}"
            conf.mkdir()
            ids = []
            for identity in fleet.register(n, "stm32f746", f"proc{n}-{time.time_ns()}"):
                base = conf / identity.device_id
                shutil.copytree(template, base / "slots")
                write_device_data(base / "data", len(ids))  # as a device has it: no sklearn
                (conf / f"{identity.device_id}.toml").write_text(render_config(
                    device_id=identity.device_id, password=identity.password,
                    mcu="stm32f746", backend="host", broker_host=broker.host,
                    broker_port=broker.port, data_dir=f"{identity.device_id}/data",
                    slot_dir=f"{identity.device_id}/slots", public_key_pem=pem))
                ids.append(identity.device_id)
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "device_agent.cli", "--simulate", str(n),
                 "--config-dir", str(conf), "--log-level", "WARNING"], env=env)
            try:
                while True:
                    with lock:
                        if set(ids) <= seen["online"]:
                            break
                    if proc.poll() is not None or time.perf_counter() - t0 > 120:
                        raise RuntimeError(f"{n} agents did not come online")
                    time.sleep(0.05)
                start_s = time.perf_counter() - t0
                time.sleep(1.0)
                _, _, cpu0 = _proc_stat(proc.pid)
                wall0 = time.perf_counter()
                time.sleep(idle_s)
                rss, hwm, cpu1 = _proc_stat(proc.pid)
                idle_cpu = (cpu1 - cpu0) / (time.perf_counter() - wall0)
                first_rss = first_rss or (counts[0], rss)
                per = ((rss - first_rss[1]) / (n - first_rss[0])
                       if n != first_rss[0] else float("nan"))
                wall0 = time.perf_counter()
                client.publish(p.cmd_topic(ids[0]),
                               p.encode(p.PersonalizeCommand(round=1)), qos=1)
                peak = rss
                while True:
                    with lock:
                        if ids[0] in seen["metrics"]:
                            break
                    if time.perf_counter() - wall0 > 300:
                        raise RuntimeError("no metrics from the round")
                    peak = max(peak, _proc_stat(proc.pid)[0])
                    time.sleep(0.02)
                round_s = time.perf_counter() - wall0
                after, hwm, cpu2 = _proc_stat(proc.pid)
                print(f"| {n} | {start_s:.1f} s | {rss / 1024:.0f} MB | "
                      f"{'-' if per != per else f'{per:.0f} kB'} | {100 * idle_cpu:.1f} % | "
                      f"{round_s:.1f} s | {100 * (cpu2 - cpu1) / round_s:.0f} % | "
                      f"{max(peak, hwm) / 1024:.0f} MB (after: {after / 1024:.0f} MB) |",
                      flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
        client.disconnect()
        client.loop_stop()
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def host_build(work: Path, repeats: int = 3) -> None:
    """A campaign class build (`build_unsigned`, as firmware.deploy.build_class calls it)
    with and without its host library, interleaved, median of `repeats`."""
    from firmware.pipeline import CompileOptions, build_unsigned
    from firmware.targets import get_target
    from tests.device_agent.images import SCHEME
    from tests.firmware.training.fixture_model import quantized

    q = quantized()
    options = CompileOptions(onnx_check=False, test_vectors=2)
    print("| MCU | QEMU check | build without host (s) | with host (s) | host adds | "
          "host payload |")
    print("|---|---|---|---|---|---|")
    for mcu in ("rp2040", "stm32f746"):
        times: dict[bool, list[float]] = {False: [], True: []}
        payload = 0
        for i in range(repeats):
            for host in (False, True):
                t0 = time.perf_counter()
                built = build_unsigned(q.graph, get_target(mcu), work / f"{mcu}-{i}-{host}",
                                       options=options, sparse_update=SCHEME.to_dict(),
                                       host=host)
                times[host].append(time.perf_counter() - t0)
                if host:
                    assert built.host_payload is not None, built.host_reason
                    payload = len(built.host_payload)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {mcu} | {'yes' if built.emulated else 'no'} | {off:.2f} | {on:.2f} | "
              f"+{on - off:.2f} s ({on / off:.2f}x) | {payload / 1024:.1f} kB |")


def main() -> None:
    """CLI."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["rounds", "install", "memory", "scale", "process",
                                         "all", "host-build"])
    parser.add_argument("--agents", default="1,50,200", help="agent counts (scale)")
    parser.add_argument("--idle-s", type=float, default=10.0)
    args = parser.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="tinyfleet-bench-agent-") as tmp:
        work = Path(tmp)
        if args.what == "host-build":
            host_build(work)
            return
        t0 = time.perf_counter()
        images = build_images(work / "images")
        print(f"images built in {time.perf_counter() - t0:.1f} s")
        if args.what in ("rounds", "all"):
            rounds(images, work / "rounds")
        if args.what in ("install", "all"):
            install(images, work / "install")
        if args.what in ("memory", "scale", "all"):
            counts = [int(c) for c in args.agents.split(",")]
            print("| agents | connect | RSS per agent | process RSS | CPU idle (of one core) |")
            print("|---|---|---|---|---|")
            memory_and_scale(images, work / "scale", counts, args.idle_s)
        if args.what in ("process", "all"):
            counts = [int(c) for c in args.agents.split(",")]
            agent_process(images, work / "process", counts, args.idle_s)


if __name__ == "__main__":
    main()
