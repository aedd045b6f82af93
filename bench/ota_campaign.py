"""A whole OTA campaign: N simulated devices in 5 MCU classes, from POST /campaigns to every
job `installed`, cold (empty caches: 5 searches, 5 builds, 5 signatures) and then cached
(the same model version again: no search, no build, no signature).

Real parts: the API (in this process), a Celery worker process (`--concurrency 2`), the MQTT
bridge process with the database sink, Redis, Mosquitto with the registry's credentials,
SQLite, and protocol reference clients (device_agent.reference_client) in `--procs`
processes that check every block's CRC, each image's sha256 and Ed25519 signature. The
model is a small digits family trained here first (not timed), or `--family DIR`.

    .venv/bin/python -m bench.ota_campaign --devices 1000 --procs 4 [--block-size 16384] [--json]
    .venv/bin/python -m bench.ota_campaign --devices 200 --procs 2 --agents

With `--agents` the devices are real agents instead: `--procs` processes of
`tinyfleet-agent --simulate N` (device_agent.cli), qemu backend, which also write each image
into an A/B slot durably and run its test vectors in QEMU before switching (the self-test).
The Cortex-M0+ class (no QEMU board) is left out: 4 classes.

Reported per run: wall time from POST to the campaign's `completed`, devices per minute,
offer-to-installed p50/p99 (job events: `offered` -> `installed`), image sizes, and the CPU
seconds of the worker, the bridge and the broker.
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
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

CLASSES = ("stm32f746", "stm32f412", "stm32h743", "stm32l476", "rp2040")
AGENT_CLASSES = CLASSES[:4]  # the qemu backend has no board for the rp2040's Cortex-M0+


def raise_nofile() -> int:
    """This process's open-file limit raised to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process and its reaped children, seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live children (a Celery worker and its pool)."""
    total = proc_cpu_s(pid)
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                total += proc_cpu_s(int(child.name))
        except (FileNotFoundError, ValueError, IndexError):
            continue
    return total


def simulate(conn: Connection, host: str, port: int,
             identities: list[tuple[str, str, str]], public_pem: bytes) -> None:
    """One simulator process: its devices on one DeviceLoop until told to stop."""
    raise_nofile()
    from device_agent.device_loop import DeviceLoop
    from device_agent.reference_client import DeviceIdentity, ReferenceDevice
    from firmware.image import load_public_key

    key = load_public_key(public_pem)
    devices = [ReferenceDevice(DeviceIdentity(d, pw, mcu), key, progress_every=0.5)
               for d, pw, mcu in identities]
    loop = DeviceLoop(host, port)
    loop.add(devices)
    loop.start()
    deadline = time.monotonic() + 120
    while not all(d.ready.is_set() for d in devices) and time.monotonic() < deadline:
        time.sleep(0.05)
    conn.send(("ready", sum(d.ready.is_set() for d in devices)))
    assert conn.recv() == "stop"
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    loop.stop()
    conn.send(("done", cpu.ru_utime + cpu.ru_stime))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def train_family(root: Path) -> Path:
    """The small digits family the tests use (tests.firmware.tiny_family's data)."""
    import numpy as np
    from click.testing import CliRunner

    from service.cli import main
    from tests.firmware.tiny_family import small_digits

    data = small_digits()
    np.savez(root / "digits.npz",
             x=np.concatenate([data.train.images, data.val.images, data.test.images]),
             y=np.concatenate([data.train.labels, data.val.labels, data.test.labels]))
    out = root / "family"
    result = CliRunner().invoke(main, [
        "train-supernet", "--data", str(root / "digits.npz"), "--epochs", "1",
        "--batch-size", "64", "--resolutions", "16,24", "--predictor-samples", "8",
        "--no-contributions", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def write_agent_configs(root: Path, identities: list[tuple[str, str, str]], procs: int,
                        public_pem: str, host: str, port: int) -> list[Path]:
    """One config directory per agent process: DIR/<id>.toml (qemu backend), each device's
    data directory holding one shared slice of the digits (so --simulate makes none)."""
    import shutil

    from device_agent.config import render_config
    from device_agent.local_data import LOCAL_NPZ, write_device_data

    sample = write_device_data(root / "sample-data", 0)
    dirs = []
    for i in range(procs):
        conf = root / f"agents{i}"
        conf.mkdir(parents=True)
        for device_id, password, mcu in identities[i::procs]:
            (conf / device_id / "data").mkdir(parents=True)
            shutil.copy(sample, conf / device_id / "data" / LOCAL_NPZ)
            (conf / f"{device_id}.toml").write_text(render_config(
                device_id=device_id, password=password, mcu=mcu, backend="qemu",
                broker_host=host, broker_port=port, data_dir=f"{device_id}/data",
                slot_dir=f"{device_id}/slots", public_key_pem=public_pem))
        dirs.append(conf)
    return dirs


def run(devices: int, procs: int, family: Path | None, timeout_s: float,
        agents: bool = False, block_size: int = 4096) -> dict[str, Any]:
    """A cold and a cached campaign over the same devices; the measurements."""
    from sqlalchemy import select

    from service.app import create_app
    from service.auth import create_token
    from service.broker_sync import full_sync
    from service.models import ClassBuild, ClassPlan, JobEvent, Role, SignedArtifact
    from service.stack.procs import ProcessSpec, spawn, stop_group
    from tests.servers import start_mosquitto, start_redis

    raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-bench-campaign-"))
    root.chmod(0o755)
    family = family or train_family(root)
    redis = start_redis(root / "redis")
    broker = start_mosquitto(root)
    var = root / "var"
    settings: dict[str, Any] = {
        "VAR_DIR": str(var), "DATABASE_URL": f"sqlite:///{var / 'tinyfleet.db'}",
        "BROKER_DIR": str(broker.files.broker_dir),
        "MOSQUITTO_PID_FILE": str(broker.files.pid_file), "MQTT_HOST": broker.host,
        "MQTT_PORT": broker.port, "REDIS_URL": redis.url, "SEARCH_POPULATION": 8,
        "SEARCH_GENERATIONS": 2, "OTA_BLOCK_SIZE": block_size}
    app = create_app(settings)
    full_sync(app.extensions["tinyfleet.engine"], broker.target)
    maker = app.extensions["tinyfleet.sessionmaker"]
    with maker() as session:
        _, secret = create_token(session, Role.ADMIN)
        session.commit()
    api = app.test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    fleet = api.post("/api/v1/fleets", json={"name": "bench"}).get_json()
    classes = AGENT_CLASSES if agents else CLASSES
    per_class = -(-devices // len(classes))
    identities: list[tuple[str, str, str]] = []
    for mcu in classes:
        n = min(per_class, devices - len(identities))
        rows = [{"name": f"bench-{mcu}-{i}", "fleet": "bench", "mcu": mcu,
                 "tags": ["bench"]} for i in range(n)]
        body = api.post("/api/v1/devices/bulk", json={"devices": rows}).get_json()
        identities += [(d["id"], d["mqtt_password"], mcu) for d in body["devices"]]
    model = api.post("/api/v1/models", json={"name": "digits", "path": str(family),
                                             "analyze": False}).get_json()["model"]["id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYFLEET_")}
    env.update({f"TINYFLEET_{k}": str(v) for k, v in settings.items()})
    env["TINYFLEET_AUTO_MIGRATE"] = "0"
    worker = spawn(ProcessSpec("worker", (
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--concurrency",
        "2", "--loglevel", "WARNING", "--without-mingle", "--without-gossip"),
        root / "worker.log", env=env))
    bridge = spawn(ProcessSpec("bridge", (sys.executable, "-m", "workers.bridge", "--sink",
                                          "workers.sink:database_sink"),
                               root / "bridge.log", env=env))
    ctx = mp.get_context("spawn")
    children = []
    agent_procs = []
    try:
        if agents:
            agent_bin = str(Path(sys.executable).with_name("tinyfleet-agent"))
            for i, conf in enumerate(write_agent_configs(
                    root, identities, procs, fleet["signing_public_key"], broker.host,
                    broker.port)):
                agent_procs.append(spawn(ProcessSpec(f"agents{i}", (
                    agent_bin, "--simulate", str(len(identities[i::procs])), "--config-dir",
                    str(conf), "--log-level", "WARNING"), root / f"agents{i}.log",
                    env={**env, "OPENBLAS_NUM_THREADS": "1"})))
        for i in range(0 if agents else procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=simulate, args=(
                child, broker.host, broker.port, identities[i::procs],
                fleet["signing_public_key"].encode()))
            proc.start()
            children.append((proc, parent))
        ready = sum(conn.recv()[1] for _, conn in children)
        assert agents or ready == devices, f"only {ready} of {devices} devices subscribed"
        online = time.monotonic() + (300 if agents else 60)
        while time.monotonic() < online:
            with maker() as session:
                from sqlalchemy import func

                from service.models import Device
                if session.scalar(select(func.count()).where(Device.online.is_(True))) == (
                        devices):
                    break
            time.sleep(0.2)
        results = {}
        for label in ("cold", "cached"):
            cpu0 = {"worker": tree_cpu_s(worker.pid), "bridge": proc_cpu_s(bridge.pid),
                    "broker": proc_cpu_s(broker.proc.pid),
                    **({"agents": sum(tree_cpu_s(a.pid) for a in agent_procs)}
                       if agents else {})}
            started = time.monotonic()
            c = api.post("/api/v1/campaigns", json={
                "model_version": model, "selector": {"tags": ["bench"]},
                "policy": {"canary_percent": 0, "batch_size": devices,
                           "max_failure_percent": 100}}).get_json()
            while True:
                seen = api.get(f"/api/v1/campaigns/{c['id']}").get_json()
                if seen["state"] not in ("running", "scheduled"):
                    break
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"{label} campaign: {seen['counts']}")
                time.sleep(0.2)
            wall = time.monotonic() - started
            cpu = {"worker": tree_cpu_s(worker.pid) - cpu0["worker"],
                   "bridge": proc_cpu_s(bridge.pid) - cpu0["bridge"],
                   "broker": proc_cpu_s(broker.proc.pid) - cpu0["broker"],
                   **({"agents": sum(tree_cpu_s(a.pid) for a in agent_procs)
                       - cpu0["agents"]} if agents else {})}
            with maker() as session:
                events = session.execute(select(JobEvent.job_id, JobEvent.state, JobEvent.at)
                                         .where(JobEvent.state.in_(("offered", "installed")))
                                         .order_by(JobEvent.id)).all()
                plans = session.scalars(select(ClassPlan)).all()
                builds = session.scalars(select(ClassBuild)).all()
                signed = session.scalars(select(SignedArtifact)).all()
            offered: dict[int, Any] = {}
            latency = []
            job_ids = {j["id"] for j in api.get(
                f"/api/v1/jobs?campaign={c['id']}&limit=1000").get_json()["items"]}
            for job_id, state, at in events:
                if job_id not in job_ids:
                    continue
                if state == "offered":
                    offered[job_id] = at
                elif job_id in offered:
                    latency.append((at - offered[job_id]).total_seconds())
            results[label] = {
                "state": seen["state"], "counts": seen["counts"], "wall_s": wall,
                "devices_per_min": seen["counts"].get("installed", 0) / wall * 60,
                "offer_to_installed_p50_s": _percentile(latency, 0.5),
                "offer_to_installed_p99_s": _percentile(latency, 0.99),
                "cpu_s": cpu, "plans": len(plans), "builds": len(builds),
                "signatures": len(signed),
                "plan_s": sorted(round(p.seconds or 0, 1) for p in plans),
                "build_s": sorted(round(b.seconds or 0, 1) for b in builds),
                "image_bytes": sorted({s.size_bytes for s in signed}),
            }
        return {"devices": devices, "procs": procs, "block_size": block_size,
                "classes": list(classes),
                "clients": "tinyfleet-agent (qemu backend)" if agents else "reference client",
                "latency_mean_s": statistics.fmean(latency) if latency else None, **results}
    finally:
        for proc, conn in children:
            try:
                conn.send("stop")
                conn.recv()
            except (EOFError, OSError):
                pass
            proc.join(10)
        for started in agent_procs:
            stop_group(started, 30.0)
        stop_group(bridge, 5.0)
        stop_group(worker, 10.0)
        broker.stop()
        redis.stop()
        app.extensions["tinyfleet.engine"].dispose()
        shutil.rmtree(root, ignore_errors=True)  # ~15-25 MB per run: logs, database, images


def main(argv: Sequence[str] | None = None) -> int:
    """Run and print the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--family", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--block-size", type=int, default=4096,
                        help="OTA block size in bytes (TINYFLEET_OTA_BLOCK_SIZE)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--agents", action="store_true",
                        help="devices run by tinyfleet-agent --simulate (qemu backend)")
    args = parser.parse_args(argv)
    out = run(args.devices, args.procs, args.family, args.timeout, args.agents,
              args.block_size)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for label in ("cold", "cached"):
        r = out[label]
        print(f"{label:>6}: {args.devices} devices, {r['state']} {r['counts']} in "
              f"{r['wall_s']:.1f} s = {r['devices_per_min']:.0f} devices/min; offer->installed "
              f"p50 {r['offer_to_installed_p50_s']:.2f} s "
              f"p99 {r['offer_to_installed_p99_s']:.2f} s; {r['plans']} plans {r['plan_s']} s, "
              f"{r['builds']} builds {r['build_s']} s, "
              f"{r['signatures']} signatures; images {r['image_bytes']} B; CPU s {r['cpu_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
