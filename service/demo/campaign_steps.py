"""The demo's whole-system steps: a model family, simulated devices, a campaign through the
queue, a personalization round, the summary table, and the dashboard's address.

Nothing here compiles or delivers in process: the campaign is started over HTTP, the stack's
Celery worker searches, builds, checks in QEMU and signs one image per hardware class, the
MQTT bridge offers and serves the blocks, and `tinyfleet-agent --simulate N` (one process
for every device, each on the QEMU backend where a board emulates its core, on the `host`
backend otherwise, which installs the class build's host library) installs, self-tests,
reports, and trains on its own slice of digits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from service.demo.runner import DemoContext, DemoError

FAMILY_CACHE_VERSION = "digits-v1"  # bump when the training below changes
# The contribution analysis is left to the stack's worker (quick settings) and cached after.
TRAIN_ARGS = ("--data", "digits", "--epochs", "2", "--resolutions", "16,24",
              "--predictor-samples", "8", "--batch-size", "64", "--no-contributions")
TAG = "demo"
CAMPAIGN_TIMEOUT_S = 420.0
ONLINE_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 180.0
FINAL_STATES = {"completed", "halted", "waiting-offline", "aborted", "closed", "rolled-back"}
# The demo's service settings: a smaller search than a real rollout's (48 x 15), quick
# contribution analysis, and a reconciler that notices lost tasks within seconds.
DEMO_SETTINGS = {"SEARCH_POPULATION": "12", "SEARCH_GENERATIONS": "3", "ANALYSIS": "quick",
                 "RECONCILE_INTERVAL_S": "2", "STUCK_AFTER_S": "60", "LEASE_S": "20"}


def cache_dir() -> Path:
    """Where the demo keeps its trained family between runs ($TINYFLEET_CACHE_DIR, else
    $XDG_CACHE_HOME/tinyfleet, else ~/.cache/tinyfleet)."""
    given = os.environ.get("TINYFLEET_CACHE_DIR")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tinyfleet"


def model_step(ctx: DemoContext) -> None:
    """Train a supernet on digits (or reuse the cached one) and register it over the API."""
    family = ctx.options.get("family")
    if family is None:
        family = cache_dir() / "demo" / FAMILY_CACHE_VERSION
        if (family / "family.json").is_file():
            ctx.say(f"    reusing the trained family in {family}")
        else:
            ctx.say(f"    training a supernet on scikit-learn's digits into {family} "
                    "(once; later demos reuse it)")
            _train(family)
    else:
        ctx.say(f"    using the family in {family}")
    _keep_builds(ctx)
    analyses = cache_dir() / "demo" / "contributions"
    kept = ctx.plan.var_dir / "contributions"
    if analyses.is_dir():  # earlier demos' analyses, by family version
        kept.mkdir(mode=0o700, exist_ok=True)
        for path in analyses.glob("*.json"):
            shutil.copy2(path, kept / path.name)
    answer = ctx.client.post("/api/v1/models", {"name": "digits", "path": str(family)})
    model = answer["model"]
    ctx.results["model"] = model["id"]
    ctx.say(f"    POST /api/v1/models: version {model['id']} ({model['kind']}, "
            f"resolutions {model['info'].get('resolutions')}, contribution analysis "
            f"{model['analysis']})")
    if model["analysis"] != "done":
        _wait_analysis(ctx, model["id"])
        analyses.mkdir(parents=True, exist_ok=True)
        for path in kept.glob("*.json"):
            shutil.copy2(path, analyses / path.name)
        ctx.say(f"    (its analysis is kept in {analyses} for the next demo)")


def _keep_builds(ctx: DemoContext) -> None:
    """Point the worker's plan/build file cache and the artifact store at the demo's cache
    folder, so that a later demo reuses them: both are content-addressed (the family's
    version is the hash of its weights, a plan's key holds the search settings, a build's
    the plan, an artifact is named by its sha256), and signatures are made per fleet anyway."""
    keep = cache_dir() / "demo" / "builds"
    for path in (keep / "cache" / "campaigns").glob("*/*.json"):
        try:  # a failure may have been the machine's (a QEMU run past its time): try again
            drop = not json.loads(path.read_text()).get("ok", False)
        except (OSError, ValueError):
            drop = True
        if drop:
            path.unlink(missing_ok=True)
    for name in ("cache/campaigns", "artifacts"):
        held, link = keep / name, ctx.plan.var_dir / name
        held.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not link.exists():
            link.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            link.symlink_to(held, target_is_directory=True)
    ctx.say(f"    plans, builds and artifacts are kept in {keep} for the next demo")


def _train(family: Path) -> None:
    tmp = family.with_name(family.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tool = Path(sys.executable).with_name("tinyfleet")
    head = [str(tool)] if tool.exists() else [sys.executable, "-c",
                                              "from service.cli import main; main()"]
    argv = [*head, "train-supernet", *TRAIN_ARGS, "--out", str(tmp)]
    env = {**os.environ, "TINYFLEET_VAR_DIR": str(tmp.parent / "train-var")}
    done = subprocess.run(argv, check=False, env=env)  # its own progress bars here
    if done.returncode != 0:
        raise DemoError(f"train-supernet failed with exit code {done.returncode}")
    shutil.rmtree(family, ignore_errors=True)
    tmp.rename(family)  # only a finished family is ever reused


def _wait_analysis(ctx: DemoContext, model_id: str) -> None:
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while time.monotonic() < deadline:
        model = ctx.client.get(f"/api/v1/models/{model_id}")
        if model["analysis"] == "done":
            ctx.say("    contribution analysis done (the worker ran it)")
            return
        if model["analysis"] == "failed":
            raise DemoError(f"contribution analysis failed: {model.get('analysis_reason')}")
        time.sleep(1.0)
    raise DemoError(f"contribution analysis not done after {ROUND_TIMEOUT_S:.0f} s")


def agents_step(ctx: DemoContext) -> None:
    """Start the devices: one `tinyfleet-agent --simulate N` for all of them, each on the QEMU
    backend where a board emulates its core, on the `host` backend otherwise (its presence
    says so, and the service offers it the class build's host library)."""
    from device_agent.config import render_config
    from device_agent.profile import host_target_name
    from firmware.targets import CATALOG
    from service.stack.procs import ProcessSpec, spawn, stop_group

    items = ctx.client.get("/api/v1/devices?limit=100")["items"]
    keys = {f["name"]: f["signing_public_key"]
            for f in ctx.client.get("/api/v1/fleets")["items"]}
    folder = ctx.var_dir / "agents"
    folder.mkdir(mode=0o700, exist_ok=True)
    runners: dict[str, str] = {}
    for index, device in enumerate(sorted(items, key=lambda d: d["name"])):
        target = CATALOG.get(device["mcu"])
        _id, password = ctx.results["credentials"][device["name"]]
        backend = "qemu" if target is not None and target.qemu_board is not None else "host"
        runners[device["id"]] = f"agent ({backend})"
        text = render_config(
            device_id=device["id"], password=password, mcu=device["mcu"], backend=backend,
            broker_host=ctx.plan.mqtt_host, broker_port=ctx.plan.mqtt_port,
            data_dir=f"{device['name']}/data", slot_dir=f"{device['name']}/slots",
            public_key_pem=keys[device["fleet"]], cpu=device["cpu"],
            sram_bytes=device["sram_bytes"], flash_bytes=device["flash_bytes"],
            slot_bytes=device["slot_bytes"])
        path = folder / f"{index:02d}-{device['name']}.toml"
        path.write_text(text)
        path.chmod(0o600)
        if backend == "qemu":
            assert target is not None
            ctx.say(f"    {device['name']:<12} {device['mcu']:<10} tinyfleet-agent, QEMU "
                    f"backend ({target.qemu_board})")
        else:
            # The worker builds its MCU image unchecked ("not emulated") and, beside it, the
            # same C as a host library checked bit-exact: that is what this agent installs.
            ctx.say(f"    {device['name']:<12} {device['mcu']:<10} tinyfleet-agent, host "
                    f"backend ({host_target_name()}): no QEMU board emulates a "
                    f"{device['cpu']}")
    ctx.results["runners"] = runners
    agents = [d for d, how in runners.items() if how.startswith("agent")]
    started = None
    if agents:
        tool = Path(sys.executable).with_name("tinyfleet-agent")
        argv = ((str(tool),) if tool.exists() else (sys.executable, "-m", "device_agent.cli")
                ) + ("--simulate", str(len(agents)), "--config-dir", str(folder))
        started = spawn(ProcessSpec("agents", argv, ctx.plan.log_dir / "agents.log",
                                    env=ctx.plan.child_env(os.environ)))
        proc = started
        ctx.cleanups.append(("agents", lambda: stop_group(proc, 15.0)))
        ctx.say(f"    tinyfleet-agent --simulate {len(agents)} --config-dir {folder} "
                f"(pid {started.pid}, log {ctx.plan.log_dir / 'agents.log'})")
    ids = set(runners)
    deadline = time.monotonic() + ONLINE_TIMEOUT_S
    online: set[str] = set()
    while time.monotonic() < deadline:
        online = _online(ctx, ids)
        if online == ids:
            break
        if started is not None and started.popen is not None and \
                started.popen.poll() is not None:
            raise DemoError(f"the agents exited ({started.popen.returncode}); see "
                            f"{ctx.plan.log_dir / 'agents.log'}")
        time.sleep(0.5)
    if online != ids:
        raise DemoError(f"{len(ids - online)} device(s) never came online within "
                        f"{ONLINE_TIMEOUT_S:.0f} s; see {ctx.plan.log_dir / 'agents.log'}")
    ctx.say(f"    all {len(ids)} devices online (their retained presence, through the bridge)")


def _online(ctx: DemoContext, ids: set[str]) -> set[str]:
    from sqlalchemy import select

    from service.models import Device

    with ctx.session() as session:
        return set(session.scalars(select(Device.id).where(Device.id.in_(ids),
                                                           Device.online.is_(True))))


def campaign_step(ctx: DemoContext) -> None:
    """Start a campaign over the API (canary first) and follow it to the end."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    body = {"model_version": ctx.results["model"], "selector": {"tags": [TAG]},
            # The demo lets its too-small device fail without halting the rollout, to show
            # the reason; a real rollout keeps the default (halt over 10 % failures).
            "policy": {"canary_percent": 30, "batch_size": 3, "max_failure_percent": 100,
                       "personalize": True, "install_deadline_s": 300}}
    campaign = ctx.client.post("/api/v1/campaigns", body)
    ctx.results["campaign"] = campaign["id"]
    ctx.say(f"    POST /api/v1/campaigns: campaign {campaign['id']}, {campaign['jobs']} jobs in "
            f"{campaign['batch_count']} batches (batch 0: the canary), personalized")
    console = Console(highlight=False)
    columns = (TextColumn("    campaign {task.fields[cid]}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("{task.fields[states]}"), TimeElapsedColumn())
    deadline = time.monotonic() + CAMPAIGN_TIMEOUT_S
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("campaign", total=campaign["jobs"], cid=campaign["id"], states="")
        while True:
            shown = ctx.client.get(f"/api/v1/campaigns/{campaign['id']}")
            finished = sum(n for s, n in shown["counts"].items() if s in _TERMINAL)
            states = ", ".join(f"{s} {n}" for s, n in sorted(shown["counts"].items()))
            bar.update(task, completed=finished,
                       states=f"{shown['state']}, batch {shown['current_batch'] + 1}/"
                              f"{shown['batch_count']}: {states}")
            _personalize_new(ctx)  # a device trains as soon as its image is installed
            if shown["state"] in FINAL_STATES:
                break
            if time.monotonic() > deadline:
                raise DemoError(f"campaign {campaign['id']} still {shown['state']} after "
                                f"{CAMPAIGN_TIMEOUT_S:.0f} s: {states}; see {ctx.plan.log_dir}")
            time.sleep(0.5)
    ctx.results["campaign_doc"] = shown
    for failure in shown["failures"]:
        ctx.say(f"    failed: {_name(ctx, failure['device'])}: {failure['reason']}")
    if shown["state"] != "completed" or not shown["counts"].get("installed"):
        raise DemoError(f"campaign {campaign['id']} ended {shown['state']}: {shown['counts']}")
    ctx.say(f"    campaign {campaign['id']} completed: {shown['counts']}")


_TERMINAL = {"installed", "failed", "skipped", "aborted", "rollback-sent", "rolled-back",
             "closed"}


def _name(ctx: DemoContext, device_id: str) -> str:
    for name, (dev_id, _password) in ctx.results["credentials"].items():
        if dev_id == device_id:
            return str(name)
    return device_id


def personalize_step(ctx: DemoContext) -> None:
    """Ask every updated device for one round of on-device training; wait for its metrics."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _personalize_new(ctx)
    installed = sorted(ctx.results["personalizing"])
    ctx.say(f"    POST /api/v1/devices/<id>/personalize to {len(installed)} devices, each as "
            "soon as its image was installed (the sparse-update scheme in its manifest)")
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    columns = (TextColumn("    round 1"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    rounds: dict[str, dict[str, Any]] = {}
    with Progress(*columns, console=Console(highlight=False)) as bar:
        task = bar.add_task("round", total=len(installed))
        while len(rounds) < len(installed):
            for device_id in installed:
                if device_id not in rounds:
                    got = ctx.client.get(f"/api/v1/devices/{device_id}/metrics")["rounds"]
                    if got:
                        rounds[device_id] = got[-1]
            bar.update(task, completed=len(rounds))
            if time.monotonic() > deadline:
                missing = ", ".join(_name(ctx, d) for d in installed if d not in rounds)
                raise DemoError(f"no metrics from {missing} after {ROUND_TIMEOUT_S:.0f} s; "
                                f"see {ctx.plan.log_dir / 'agents.log'}")
            time.sleep(0.5)
    ctx.results["rounds"] = rounds


def _personalize_new(ctx: DemoContext) -> None:
    """Start a round on every agent-run device whose job is installed and has none yet."""
    asked: set[str] = ctx.results.setdefault("personalizing", set())
    runners = ctx.results["runners"]
    for device_id, (state, _reason) in _job_states(ctx).items():
        if state == "installed" and device_id not in asked and \
                runners.get(device_id, "").startswith("agent"):
            ctx.client.post(f"/api/v1/devices/{device_id}/personalize", {})
            asked.add(device_id)


def _job_states(ctx: DemoContext) -> dict[str, tuple[str, str | None]]:
    jobs = ctx.client.get(f"/api/v1/jobs?campaign={ctx.results['campaign']}&limit=100")
    return {j["device"]: (j["state"], j["reason"]) for j in jobs["items"]}


def summary_step(ctx: DemoContext) -> None:
    """Per device: model, schedule, predicted and measured SRAM, Flash, accuracy."""
    from rich.console import Console
    from rich.table import Table

    jobs = _job_details(ctx)
    rounds: dict[str, dict[str, Any]] = ctx.results.get("rounds", {})
    runners = ctx.results.get("runners", {})
    table = Table(title=f"campaign {ctx.results['campaign']}, one row per device (kB = 1024 B)",
                  title_justify="left")
    for title, right in (("device", False), ("MCU", False), ("runs on", False),
                         ("outcome", False), ("model (subnet)", False), ("schedule", False),
                         ("SRAM predicted", True), ("SRAM measured", True), ("Flash", True),
                         ("accuracy before", True), ("after", True)):
        table.add_column(title, justify="right" if right else "left")
    reasons = []
    for name, (device_id, _password) in sorted(ctx.results["credentials"].items()):
        job = jobs.get(device_id, {})
        memory = (job.get("manifest") or {}).get("memory") or {}
        predicted, measured = memory.get("predicted") or {}, memory.get("measured") or {}
        r = rounds.get(device_id)
        outcome = job.get("state", "-")
        if job.get("reason") and outcome != "installed":
            reasons.append(f"{name}: {job['reason']}")
        table.add_row(
            name, job.get("mcu", ""), runners.get(device_id, ""), outcome,
            job.get("subnet", ""), _schedule(job.get("manifest") or {}),
            _kb(predicted.get("sram_bytes")),
            _kb(measured.get("sram_bytes")) if job.get("emulated") else (
                "not emulated" if job.get("manifest") else ""),
            _kb(predicted.get("flash_bytes")),
            f"{r['accuracy_before']:.1%}" if r else "", f"{r['accuracy_after']:.1%}" if r else "")
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)  # a log file: no wrapping at 80
    console.print(table)
    for line in reasons:
        ctx.say(f"    {line}")


def _kb(n: int | None) -> str:
    return "" if n is None else f"{n / 1024:.1f} kB"


def _schedule(manifest: dict[str, Any]) -> str:
    sched = manifest.get("schedule") or {}
    if not sched:
        return ""
    patches = sched.get("patches", 1)
    if patches in (None, 1):
        return "layer-based"
    return f"{patches}x{patches} patches to {sched.get('split_after')}"


def _job_details(ctx: DemoContext) -> dict[str, dict[str, Any]]:
    from sqlalchemy import and_, select

    from service.models import ClassBuild, ClassPlan, DeploymentJob, Device

    model = ctx.results["model"]
    out: dict[str, dict[str, Any]] = {}
    with ctx.session() as session:
        rows = session.execute(
            select(DeploymentJob, Device.mcu, ClassBuild.manifest, ClassPlan.result)
            .join(Device, Device.id == DeploymentJob.device_id)
            .outerjoin(ClassBuild, and_(ClassBuild.hw_class == DeploymentJob.hw_class,
                                        ClassBuild.model_version_id == model))
            .outerjoin(ClassPlan, and_(ClassPlan.hw_class == DeploymentJob.hw_class,
                                       ClassPlan.model_version_id == model))
            .where(DeploymentJob.campaign_id == ctx.results["campaign"]))
        for job, mcu, manifest, plan in rows:
            config = (json.loads(plan) if plan else {}).get("config") or {}
            out[job.device_id] = {"state": job.state.value, "reason": job.reason, "mcu": mcu,
                                  "emulated": job.emulated, "subnet": config.get("name", ""),
                                  "manifest": json.loads(manifest) if manifest else None}
    return out


def _show_metrics(ctx: DemoContext, token: str) -> None:
    """One scrape of /metrics: a few of the stack's figures, the bridge's among them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"{ctx.plan.http_url}/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read().decode()
    wanted = {"tinyfleet_bridge_up", "tinyfleet_bridge_messages_total",
              "tinyfleet_bridge_blocks_sent_total", "tinyfleet_jobs",
              "tinyfleet_devices_online"}
    shown = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                shown.append(f"{sample.name}{{{labels}}} {sample.value:g}" if labels
                             else f"{sample.name} {sample.value:g}")
    ctx.say("    one scrape of /metrics (the bridge's counters come through it):")
    for line in shown:
        ctx.say(f"      {line}")


def dashboard_step(ctx: DemoContext) -> None:
    """Print the dashboard's address and an operator token; wait for Ctrl-C unless --once."""
    from service.auth import create_token
    from service.models import Role

    with ctx.session() as session:
        _token, secret = create_token(session, Role.OPERATOR, name="demo-dashboard")
        session.commit()
    ctx.say(f"    dashboard: {ctx.plan.http_url}/login")
    ctx.say(f"    operator token (log in with it; stored hashed): {secret}")
    ctx.say(f"    campaign:  {ctx.plan.http_url}/campaigns/{ctx.results['campaign']}")
    ctx.say(f"    metrics:   {ctx.plan.http_url}/metrics (the same token as a Bearer header)")
    _show_metrics(ctx, secret)
    if ctx.options.get("once"):
        return
    ctx.say("    the stack keeps running: press Ctrl-C to stop it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ctx.say("")
