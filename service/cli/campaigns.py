"""`tinyfleet campaigns start|list|show|watch|pause|resume|abort|close|rollback`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

from service.cli.context import app_session, echo_json, fail
from service.cli.ui import print_table, progress_bar
from service.problems import ApiError

FINAL = {"completed", "halted", "aborted", "closed", "rolled-back", "waiting-offline"}
DONE_JOB_STATES = {"installed", "failed", "skipped", "aborted", "rollback-sent",
                   "rolled-back", "closed", "waiting-offline"}


@click.group()
def campaigns() -> None:
    """Start OTA campaigns, follow them, and pause, resume, abort, close or roll them back."""


def _run(action: Callable[[Any], dict[str, Any]], as_json: bool) -> dict[str, Any]:
    """Run `action(session)` inside the app (its queue reachable); ApiError -> exit 1."""
    with app_session() as (app, session), app.app_context():
        try:
            return action(session)
        except ApiError as err:
            fail(err, as_json)


def _summary(c: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in c["counts"].items())
    lines = [f"campaign {c['id']}: model {c['model_version']}, {c['state']}"
             + (f" ({c['halt_reason']})" if c["halt_reason"] else ""),
             f"  {c['jobs']} jobs in {c['batch_count']} batches (released up to "
             f"{c['current_batch']}): {counts}"]
    for f in c["failures"][:20]:
        lines.append(f"  failed {f['device']} (batch {f['batch']}): {f['reason']}")
    return "\n".join(lines)


@campaigns.command("start")
@click.argument("model_version")
@click.option("--fleet", help="devices of this fleet")
@click.option("--tag", "tags", multiple=True, help="devices with this tag (repeatable)")
@click.option("--device", "ids", multiple=True, help="a device id or name (repeatable)")
@click.option("--mcu", help="devices of this catalog MCU")
@click.option("--canary-percent", type=float, default=10.0, show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--max-failure-percent", type=float, default=10.0, show_default=True)
@click.option("--personalize", is_flag=True, help="ship the sparse-update scheme")
@click.option("--start-at", help="ISO 8601 time with a zone; default: now")
@click.option("--offer-deadline", "offer_deadline_s", type=int, default=3600,
              show_default=True, help="seconds")
@click.option("--install-deadline", "install_deadline_s", type=int, default=1800,
              show_default=True, help="seconds")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def start(model_version: str, fleet: str | None, tags: tuple[str, ...], ids: tuple[str, ...],
          mcu: str | None, canary_percent: float, batch_size: int, max_failure_percent: float,
          personalize: bool, start_at: str | None, offer_deadline_s: int,
          install_deadline_s: int, as_json: bool) -> None:
    """Start a campaign of MODEL_VERSION over the selected devices."""
    from service.campaigns import campaign_json, create_campaign
    from service.parsing import validate
    from service.queue import enqueue
    from service.schemas import CampaignCreate

    selector: dict[str, Any] = {"tags": list(tags), "ids": list(ids)}
    if fleet is not None:
        selector["fleet"] = fleet
    if mcu is not None:
        selector["mcu"] = mcu
    policy: dict[str, Any] = {
        "canary_percent": canary_percent, "batch_size": batch_size,
        "max_failure_percent": max_failure_percent, "personalize": personalize,
        "offer_deadline_s": offer_deadline_s, "install_deadline_s": install_deadline_s}
    if start_at is not None:
        policy["start_at"] = start_at

    def action(session: Any) -> dict[str, Any]:
        spec = validate(CampaignCreate, {"model_version": model_version,
                                         "selector": selector, "policy": policy})
        created = create_campaign(session, spec, enqueue)
        return campaign_json(session, created.campaign)

    out = _run(action, as_json)
    echo_json(out) if as_json else click.echo(_summary(out))


@campaigns.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def list_cmd(as_json: bool) -> None:
    """Campaigns, newest first."""
    from sqlalchemy import select

    from service.campaigns import campaign_json
    from service.models import Campaign

    def action(session: Any) -> dict[str, Any]:
        rows = session.scalars(select(Campaign).order_by(Campaign.id.desc()).limit(1000))
        return {"items": [campaign_json(session, c) for c in rows]}

    out = _run(action, as_json)
    if as_json:
        echo_json(out)
        return
    print_table(["ID", "MODEL", "STATE", "JOBS", "INSTALLED", "FAILED", "CREATED"],
                [[str(c["id"]), c["model_version"], c["state"], str(c["jobs"]),
                  str(c["counts"].get("installed", 0)), str(c["counts"].get("failed", 0)),
                  c["created_at"] or ""] for c in out["items"]], right={0, 3, 4, 5})


def _show(campaign_id: int, as_json: bool) -> dict[str, Any]:
    from service.campaigns import campaign_json, get_campaign

    return _run(lambda s: campaign_json(s, get_campaign(s, campaign_id)), as_json)


@campaigns.command("show")
@click.argument("campaign_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def show(campaign_id: int, as_json: bool) -> None:
    """A campaign's progress: jobs per state and per batch, failures with reasons."""
    out = _show(campaign_id, as_json)
    if as_json:
        echo_json(out)
        return
    click.echo(_summary(out))
    print_table(["BATCH", "JOBS", "STATES"],
                [[str(b["batch"]), str(sum(b["counts"].values())),
                  ", ".join(f"{n} {s}" for s, n in b["counts"].items())]
                 for b in out["batches"]], right={0, 1})


@campaigns.command("watch")
@click.argument("campaign_id", type=int)
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=None,
              help="give up after this many seconds (exit 2)")
@click.option("--json", "as_json", is_flag=True, help="print the final state as JSON")
def watch(campaign_id: int, interval: float, timeout_s: float | None, as_json: bool) -> None:
    """Follow a campaign with a live progress bar until it ends (or waits for devices)."""
    started = time.monotonic()
    out = _show(campaign_id, as_json)
    with progress_bar(f"campaign {campaign_id}", max(out["jobs"], 1)) as update:
        while True:
            done = sum(n for s, n in out["counts"].items() if s in DONE_JOB_STATES)
            update(done, total=max(out["jobs"], 1),
                   label=f"campaign {campaign_id} {out['state']}: "
                         f"{out['counts'].get('installed', 0)} installed, "
                         f"{out['counts'].get('failed', 0)} failed")
            if out["state"] in FINAL:
                break
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                echo_json(out) if as_json else click.echo(_summary(out))
                raise SystemExit(2)
            time.sleep(interval)
            out = _show(campaign_id, as_json)
    echo_json(out) if as_json else click.echo(_summary(out))


def _simple(name: str, help_text: str) -> None:
    @campaigns.command(name, help=help_text)
    @click.argument("campaign_id", type=int)
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    def command(campaign_id: int, as_json: bool) -> None:
        from service import campaigns as ops
        from service.jobs import ROLLBACK_TASK
        from service.queue import enqueue

        def action(session: Any) -> dict[str, Any]:
            if name == "pause":
                campaign = ops.pause(session, campaign_id)
            elif name == "resume":
                campaign = ops.resume(session, campaign_id, enqueue)
            elif name == "abort":
                campaign = ops.abort(session, campaign_id)
            elif name == "close":
                campaign = ops.close(session, campaign_id)
            else:
                campaign, _ = ops.rollback(
                    session, campaign_id, lambda job_id: enqueue(ROLLBACK_TASK, [job_id]))
            return ops.campaign_json(session, campaign)

        out = _run(action, as_json)
        echo_json(out) if as_json else click.echo(_summary(out))


_simple("pause", "Pause: no new batch and no new offer (jobs on devices go on).")
_simple("resume", "Resume a paused campaign.")
_simple("abort", "Abort: every unfinished job ends aborted.")
_simple("close", "Close a campaign waiting for offline devices (or halted).")
_simple("rollback", "Send `rollback` to every device the campaign updated.")
