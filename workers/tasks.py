"""Celery tasks. Thin: they take ids, call firmware/, record results, and are idempotent.

Per deployment job: `plan` -> `build` -> `offer` (service.jobs names them). Plans and builds
are cached per (model version, hardware class) in class_plans / class_builds (a unique
constraint each) and, across databases, as files under VAR_DIR/cache/campaigns; a build is
signed once per (build, fleet) (signed_artifacts, unique). Whoever inserts the class's row
(or takes over an expired lease) does the work, renewing its lease meanwhile; jobs that find
the work running wait in their state and are sent on by the owner when it is done (the
reconciler re-sends anything missed). Every task is `acks_late` with
`task_reject_on_worker_lost`: a task whose worker died is delivered again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from celery import shared_task
from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from service import jobs as J
from service.models import (
    AnalysisState,
    Campaign,
    CampaignState,
    ClassBuild,
    ClassPlan,
    DeploymentJob,
    Device,
    Fleet,
    JobState,
    ModelKind,
    ModelVersion,
    SignedArtifact,
    WorkState,
    utcnow,
)

log = logging.getLogger(__name__)

# Errors worth a retry with back-off (a busy database, a broker hiccup); anything else is
# either a job failure with its reason or a bug.
TRANSIENT = (OperationalError, ConnectionError, TimeoutError)
TASK_OPTIONS: dict[str, Any] = {
    "bind": True, "acks_late": True, "reject_on_worker_lost": True,
    "autoretry_for": TRANSIENT, "retry_backoff": 2, "retry_backoff_max": 60,
    "retry_jitter": True, "max_retries": 10, "ignore_result": True,
}
CACHE_DIR = "cache/campaigns"

Row = TypeVar("Row", ClassPlan, ClassBuild)


@shared_task(name="tinyfleet.ping", ignore_result=False)  # type: ignore[untyped-decorator]
def ping(payload: str = "ping") -> dict[str, object]:
    """Echo `payload` with the worker's host, pid and app name: proves a task round-trips."""
    return {
        "payload": payload,
        "worker": socket.gethostname(),
        "pid": os.getpid(),
        "app": current_app.name,  # only set inside the Flask app context
        "time": time.time(),
    }


# ---- plumbing --------------------------------------------------------------------------------

@contextmanager
def _session() -> Iterator[Session]:
    session: Session = current_app.extensions["tinyfleet.sessionmaker"]()
    try:
        yield session
    finally:
        session.close()


def enqueue(name: str, args: list[Any]) -> None:
    """Send a task by name on this worker's Celery app."""
    current_app.extensions["celery"].send_task(name, args=args)


def _var_dir() -> Path:
    return Path(current_app.config["VAR_DIR"])


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:64]


def _cache_file(model_version: str, hw_class: str, kind: str) -> Path:
    return _var_dir() / CACHE_DIR / model_version / f"{hw_class}.{kind}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _store() -> Any:
    from workers.artifacts import ArtifactStore

    return ArtifactStore.from_config(current_app.config)


def _load_job(session: Session, job_id: int, states: tuple[JobState, ...]
              ) -> tuple[DeploymentJob, Campaign] | None:
    """The job and its campaign when the job waits in one of `states` and the campaign
    runs; None (nothing to do: a duplicate delivery, or paused/aborted) otherwise."""
    job = session.get(DeploymentJob, job_id)
    if job is None or job.state not in states:
        return None
    campaign = session.get(Campaign, job.campaign_id)
    if campaign is None or campaign.state not in (CampaignState.RUNNING,
                                                  CampaignState.HALTED,
                                                  CampaignState.WAITING_OFFLINE):
        return None  # paused: `resume` sends it again; aborted: nothing more to do
    return job, campaign


def claim(session: Session, model: type[Row], version: str, hw_class: str, lease_s: float
          ) -> tuple[Row, bool]:
    """The class's row, and True when this worker now owns the work: it inserted the row
    (the unique constraint lets one insert win) or took over an expired lease (a
    compare-and-set on lease_until lets one take it)."""
    now = utcnow()
    row = session.scalar(select(model).where(model.model_version_id == version,
                                             model.hw_class == hw_class))
    if row is None:
        # The caller's changes first: losing the insert race rolls back, and only the insert.
        session.commit()
        row = model(model_version_id=version, hw_class=hw_class, state=WorkState.RUNNING,
                    owner=_owner(), lease_until=now + timedelta(seconds=lease_s))
        session.add(row)
        try:
            session.commit()
            return row, True
        except IntegrityError:
            session.rollback()
            found = session.scalar(select(model).where(model.model_version_id == version,
                                                       model.hw_class == hw_class))
            assert found is not None
            return found, False
    lease = J.aware(row.lease_until)
    if row.state is not WorkState.RUNNING or (lease is not None and lease > now):
        return row, False
    won = session.execute(update(model).where(
        model.id == row.id, model.state == WorkState.RUNNING, model.lease_until < now)
        .values(owner=_owner(), lease_until=now + timedelta(seconds=lease_s))
        # No in-Python evaluation against loaded rows (SQLite hands back naive datetimes).
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    if won:
        log.warning("took over %s %s/%s from an expired lease", model.__tablename__, version,
                    hw_class)
    session.refresh(row)
    return row, bool(won)


@contextmanager
def _lease_renewed(model: type[Row] | type[ModelVersion], row_id: int | str, lease_s: float,
                   owner_column: str = "owner", lease_column: str = "lease_until"
                   ) -> Iterator[None]:
    """Renew this worker's lease on a row every third of its length while the body runs."""
    stop = threading.Event()
    maker = current_app.extensions["tinyfleet.sessionmaker"]
    owner = _owner()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                with maker() as s:
                    s.execute(update(model).where(model.id == row_id,
                                                  getattr(model, owner_column) == owner)
                              .values({lease_column: utcnow() + timedelta(seconds=lease_s)})
                              .execution_options(synchronize_session=False))
                    s.commit()
            except OperationalError as exc:  # a busy database: the next beat tries again
                log.warning("lease renewal failed: %s", exc)

    thread = threading.Thread(target=renew, name="lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _finish(session: Session, row: Row, **values: Any) -> None:
    for key, value in values.items():
        setattr(row, key, value)
    row.lease_until = None
    session.commit()


def _wake(session: Session, version: str, hw_class: str, state: JobState, task: str) -> None:
    """Send `task` for every job of the class waiting in `state` (the owner's fan-out)."""
    ids = session.scalars(select(DeploymentJob.id).join(
        Campaign, Campaign.id == DeploymentJob.campaign_id).where(
        Campaign.model_version_id == version, DeploymentJob.hw_class == hw_class,
        DeploymentJob.state == state)).all()
    for job_id in ids:
        enqueue(task, [job_id])


def _settings_key() -> dict[str, Any]:
    cfg = current_app.config
    return {"population": int(cfg["SEARCH_POPULATION"]),
            "generations": int(cfg["SEARCH_GENERATIONS"])}


# ---- plan ------------------------------------------------------------------------------------

@shared_task(name=J.PLAN_TASK, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def plan(self: Any, job_id: int) -> None:
    """The job's class plan: cached, or searched here; then on to `build`."""
    with _session() as session:
        loaded = _load_job(session, job_id, (JobState.QUEUED, JobState.PLANNING))
        if loaded is None:
            return
        job, campaign = loaded
        job.attempts += 1
        if _skip_without_toolchain(session, job):
            return
        if job.state is not JobState.PLANNING:
            J.set_state(session, job, JobState.PLANNING, "worker")
        session.commit()  # waiting in PLANNING before looking: the owner's fan-out sees it
        row, mine = claim(session, ClassPlan, campaign.model_version_id, job.hw_class,
                          float(current_app.config["LEASE_S"]))
        if mine:
            row = _run_plan(session, row, campaign.model_version_id, job)
        _after_plan(session, job, row)


def _skip_without_toolchain(session: Session, job: DeploymentJob) -> bool:
    """Skip a job whose core no installed compiler builds (ESP32's Xtensa), with that
    reason: nothing is searched, built or offered, and no device failed (the campaign's
    failure share leaves it out)."""
    from firmware.deploy import HardwareClass
    from firmware.toolchain.build import missing_toolchain

    reason = missing_toolchain(HardwareClass.from_dict(json.loads(job.hw)).cpu)
    if reason is None:
        return False
    J.set_state(session, job, JobState.SKIPPED, "worker", reason)
    session.commit()
    J.advance(session, job.campaign_id, enqueue)
    return True


def _run_plan(session: Session, row: ClassPlan, version: str, job: DeploymentJob) -> ClassPlan:
    from firmware.deploy import HardwareClass, SearchSettings, plan_class
    from firmware.deploy import ModelKind as Kind
    from firmware.errors import FirmwareError
    from service.model_versions import model_path

    model = session.get(ModelVersion, version)
    assert model is not None
    hw = HardwareClass.from_dict(json.loads(job.hw))
    cache = _cache_file(version, job.hw_class, "plan-" + _digest(_settings_key()))
    started = time.monotonic()
    with _lease_renewed(ClassPlan, row.id, float(current_app.config["LEASE_S"])):
        if cache.is_file():
            data = json.loads(cache.read_text())
            from_cache = True
        else:
            from_cache = False
            try:
                result = plan_class(Kind(model.kind.value), model_path(model), hw, _var_dir(),
                                    SearchSettings(**_settings_key()))
                data = {"ok": True, "result": result}
            except FirmwareError as exc:  # nothing fits, no toolchain: the class's answer
                data = {"ok": False, "reason": _short(str(exc))}
            _write_atomic(cache, json.dumps(data))
    seconds = time.monotonic() - started
    if data["ok"]:
        _finish(session, row, state=WorkState.DONE, result=json.dumps(data["result"]),
                from_cache=from_cache, seconds=seconds)
    else:
        _finish(session, row, state=WorkState.FAILED, reason=data["reason"],
                from_cache=from_cache, seconds=seconds)
    log.info("plan %s/%s: %s in %.1f s%s", version, job.hw_class, row.state.value, seconds,
             " (file cache)" if from_cache else "")
    _wake(session, version, job.hw_class, JobState.PLANNING, J.PLAN_TASK)
    return row


def _after_plan(session: Session, job: DeploymentJob, row: ClassPlan) -> None:
    if row.state is WorkState.RUNNING:
        return  # another worker plans this class; it sends this job on when done
    if row.state is WorkState.FAILED:
        J.fail(session, job, row.reason or "the plan failed", "worker", enqueue)
        return
    J.set_state(session, job, JobState.BUILDING, "worker")
    # On at once: a cached build costs no second task, and no commit of its own (the build
    # step commits on every way out; the cached path's building -> offering -> offered is
    # one transaction).
    _build_step(session, job.id)


def _digest(data: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def _short(text: str) -> str:
    return text if len(text) <= 1000 else text[:997] + "..."


# ---- build + sign ------------------------------------------------------------------------------

@shared_task(name=J.BUILD_TASK, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def build(self: Any, job_id: int) -> None:
    """The job's class build (cached, or compiled + checked here), signed for its fleet;
    then on to `offer`."""
    with _session() as session:
        _build_step(session, job_id)


def _build_step(session: Session, job_id: int) -> None:
    loaded = _load_job(session, job_id, (JobState.BUILDING,))
    if loaded is None:
        session.commit()  # what the caller recorded (paused, aborted: it waits as it is)
        return
    job, campaign = loaded
    version = campaign.model_version_id
    plan_row = session.scalar(select(ClassPlan).where(
        ClassPlan.model_version_id == version, ClassPlan.hw_class == job.hw_class))
    if plan_row is None or plan_row.state is not WorkState.DONE:
        J.set_state(session, job, JobState.QUEUED, "worker", "no plan yet")
        session.commit()
        enqueue(J.PLAN_TASK, [job.id])
        return
    row, mine = claim(session, ClassBuild, version, job.hw_class,
                      float(current_app.config["LEASE_S"]))
    if mine:
        row = _run_build(session, row, version, job, json.loads(plan_row.result or "{}"))
    if row.state is WorkState.RUNNING:
        session.commit()  # waiting in BUILDING, where the owner's fan-out finds it
        return  # the owner sends this job on
    if row.state is WorkState.FAILED:
        J.fail(session, job, row.reason or "the build failed", "worker", enqueue)
        return
    sha = sign_for_fleet(session, row, job.fleet_id)
    job.artifact_sha256 = sha
    job.emulated = row.emulated
    J.set_state(session, job, JobState.OFFERING, "worker", None if row.emulated else
                "not emulated: the core has no QEMU board; built, never run")
    _offer_step(session, job.id)  # commits on every way out


def _run_build(session: Session, row: ClassBuild, version: str, job: DeploymentJob,
               plan_result: dict[str, Any]) -> ClassBuild:
    from firmware.deploy import HardwareClass, build_class
    from firmware.deploy import ModelKind as Kind
    from firmware.errors import FirmwareError
    from service.model_versions import model_path

    model = session.get(ModelVersion, version)
    assert model is not None
    hw = HardwareClass.from_dict(json.loads(job.hw))
    # "build2": builds with their host library (older cache files have none).
    cache = _cache_file(version, job.hw_class, "build2-" + _digest(plan_result))
    store = _store()
    started = time.monotonic()
    with _lease_renewed(ClassBuild, row.id, float(current_app.config["LEASE_S"])):
        data = json.loads(cache.read_text()) if cache.is_file() else None
        from_cache = data is not None and (not data["ok"] or (
            store.exists(data["payload"]) and (data["host_payload"] is None
                                               or store.exists(data["host_payload"]))))
        if not from_cache:
            try:
                with tempfile.TemporaryDirectory(prefix="build-") as work:
                    built = build_class(Kind(model.kind.value), model_path(model), hw,
                                        plan_result, Path(work), model.name, version)
                payload_sha = store.put(built.payload)
                data = {"ok": True, "payload": payload_sha,
                        "manifest": built.manifest.to_json().decode(),
                        "emulated": built.emulated, "report": dict(built.report),
                        "host_target": None, "host_payload": None, "host_manifest": None,
                        "host_reason": (None if built.host_reason is None
                                        else _short(built.host_reason))}
                if built.host_manifest is not None and built.host_payload is not None:
                    data.update(host_target=built.host_manifest.target.name,
                                host_payload=store.put(built.host_payload),
                                host_manifest=built.host_manifest.to_json().decode())
            except FirmwareError as exc:
                data = {"ok": False, "reason": _short(str(exc))}
            _write_atomic(cache, json.dumps(data))
    assert data is not None
    seconds = time.monotonic() - started
    if data["ok"]:
        _finish(session, row, state=WorkState.DONE, payload_sha256=data["payload"],
                manifest=data["manifest"], emulated=data["emulated"],
                report=json.dumps(data["report"]), host_target=data["host_target"],
                host_payload_sha256=data["host_payload"], host_manifest=data["host_manifest"],
                host_reason=data["host_reason"], from_cache=from_cache, seconds=seconds)
    else:
        _finish(session, row, state=WorkState.FAILED, reason=data["reason"],
                from_cache=from_cache, seconds=seconds)
    log.info("build %s/%s: %s in %.1f s%s", version, job.hw_class, row.state.value, seconds,
             " (file cache)" if from_cache else "")
    _wake(session, version, job.hw_class, JobState.BUILDING, J.BUILD_TASK)
    return row


def sign_for_fleet(session: Session, row: ClassBuild, fleet_id: int) -> str:
    """The build signed with the fleet's key, stored once per (build, fleet); its sha256.
    Its host library (when built) is signed beside it (`SignedArtifact.host_sha256`: what
    `workers.offers.artifact_for_backend` offers a device whose agent runs the host
    backend)."""
    found = session.scalar(select(SignedArtifact).where(
        SignedArtifact.build_id == row.id, SignedArtifact.fleet_id == fleet_id))
    store = _store()
    if found is not None and store.exists(found.sha256) and (
            row.host_payload_sha256 is None
            or (found.host_sha256 is not None and store.exists(found.host_sha256))):
        return found.sha256
    from firmware.image import parse_manifest, sign_image
    from service.fleets import load_signing_key

    fleet = session.get(Fleet, fleet_id)
    assert fleet is not None and row.manifest is not None and row.payload_sha256 is not None
    key = load_signing_key(fleet)
    # Ed25519 signatures are deterministic: a racing signer writes the very same bytes.
    image = sign_image(parse_manifest(row.manifest.encode()), store.read(row.payload_sha256),
                       key)
    sha: str = store.put(image)
    host_sha = None
    if row.host_payload_sha256 is not None and row.host_manifest is not None:
        host_sha = store.put(sign_image(parse_manifest(row.host_manifest.encode()),
                                        store.read(row.host_payload_sha256), key))
    if found is not None and found.host_sha256 != host_sha:
        found.host_sha256 = host_sha
        session.commit()
    if found is None:
        session.commit()  # the caller's changes first, as in claim()
        session.add(SignedArtifact(build_id=row.id, fleet_id=fleet_id, sha256=sha,
                                   size_bytes=len(image), host_sha256=host_sha))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
    return sha


# ---- offer -------------------------------------------------------------------------------------

_publisher: dict[int, Any] = {}  # pid -> this process's CommandPublisher


def publisher() -> Any:
    """This process's MQTT command publisher (workers.bridge), made on first use (a forked
    pool child gets its own)."""
    from workers.bridge import CommandPublisher

    found = _publisher.get(os.getpid())
    if found is None:
        found = _publisher[os.getpid()] = CommandPublisher.for_process(current_app.config)
    return found


def offer_message(job: DeploymentJob, campaign: Campaign) -> Any:
    """The job's OtaOffer, with its deadlines as unix times."""
    from workers.offers import offer_for

    assert job.artifact_sha256 is not None
    return offer_for(_store(), job.artifact_sha256, job.update_id or f"u{job.id}",
                     block_size=int(current_app.config.get("OTA_BLOCK_SIZE", 4096)),
                     offer_deadline_s=campaign.offer_deadline_s,
                     install_deadline_s=campaign.install_deadline_s)


@shared_task(name=J.OFFER_TASK, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def offer(self: Any, job_id: int) -> None:
    """Offer the job's image to its device, or wait for the device to come online."""
    with _session() as session:
        _offer_step(session, job_id)


def _offer_step(session: Session, job_id: int) -> None:
    loaded = _load_job(session, job_id, (JobState.OFFERING,))
    if loaded is None:
        session.commit()  # what the caller recorded
        return
    job, campaign = loaded
    if campaign.state is CampaignState.HALTED:
        session.commit()  # waits in OFFERING: halted, no new offers
        return
    job.update_id = job.update_id or f"u{job.id}"
    # Only whether it is online and what it runs: not the row (its fleet and tags come with it).
    found = session.execute(select(Device.online, Device.backend).where(
        Device.id == job.device_id)).one()
    online, backend = found
    assert job.artifact_sha256 is not None
    if not online:
        J.set_state(session, job, JobState.WAITING_OFFLINE, "worker",
                    "the device is offline; offered when it comes online")
        session.commit()
        J.advance(session, campaign.id, enqueue)
        return
    from workers.offers import NoArtifactForBackend, artifact_for_backend

    try:  # the MCU image, or the host library for an agent on the host backend
        job.artifact_sha256 = artifact_for_backend(session, job, backend)
    except NoArtifactForBackend as exc:
        J.fail(session, job, str(exc), "worker", enqueue)
        return
    message = offer_message(job, campaign)
    # Recorded before sending: a device may answer before this task commits.
    J.set_state(session, job, JobState.OFFERED, "worker")
    job.offered_at = utcnow()
    session.commit()
    publisher().publish(job.device_id, message)


@shared_task(name=J.ROLLBACK_TASK, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def rollback(self: Any, job_id: int) -> None:
    """Send the `rollback` command for a job the operator rolled back."""
    from device_agent.protocol import RollbackCommand

    with _session() as session:
        job = session.get(DeploymentJob, job_id)
        if job is None or job.state is not JobState.ROLLBACK_SENT:
            return
        publisher().publish(job.device_id, RollbackCommand(
            update_id=job.update_id, reason=f"campaign {job.campaign_id} rolled back"))


# ---- analysis and the reconciler ----------------------------------------------------------

@shared_task(name=J.ANALYZE_TASK, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def analyze(self: Any, version: str) -> None:
    """A family version's contribution analysis (on-device training needs it), under a lease
    its worker renews: one whose worker died is taken over once the lease has passed, and
    failed with that reason after MAX_ANALYSIS_ATTEMPTS takes."""
    from firmware.errors import FirmwareError
    from firmware.personalize import (
        DEFAULT_ANALYSIS,
        QUICK_ANALYSIS,
        family_contributions,
        save_contributions,
    )
    from service.model_versions import model_path

    lease_s = float(current_app.config["LEASE_S"])
    with _session() as session:
        if not _claim_analysis(session, version, lease_s):
            return  # done, running under a live lease, or not a family: a duplicate
        model = session.get(ModelVersion, version)
        assert model is not None
        if model.analysis_attempts > MAX_ANALYSIS_ATTEMPTS:
            _end_analysis(session, model, AnalysisState.FAILED,
                          f"the analysis was interrupted {model.analysis_attempts - 1} times "
                          f"(its worker died or was killed mid-run, its lease ran out); "
                          f"not tried again")
            return
        settings = QUICK_ANALYSIS if current_app.config["ANALYSIS"] == "quick" else (
            DEFAULT_ANALYSIS)
        try:
            with _lease_renewed(ModelVersion, version, lease_s, "analysis_owner",
                                "analysis_lease_until"):
                found = family_contributions(model_path(model), settings)
                save_contributions(_var_dir(), found)
        except FirmwareError as exc:
            _end_analysis(session, model, AnalysisState.FAILED, _short(str(exc)))
        else:
            _end_analysis(session, model, AnalysisState.DONE, None)


MAX_ANALYSIS_ATTEMPTS = 3


def _claim_analysis(session: Session, version: str, lease_s: float) -> bool:
    """Take a family version's analysis: queued, or running under a lease that has passed
    (its worker died); a compare-and-set lets one worker take it."""
    now = utcnow()
    won = session.execute(update(ModelVersion).where(
        ModelVersion.id == version, ModelVersion.kind == ModelKind.FAMILY,
        (ModelVersion.analysis_state == AnalysisState.QUEUED)
        | ((ModelVersion.analysis_state == AnalysisState.RUNNING)
           & (ModelVersion.analysis_lease_until.is_(None)
              | (ModelVersion.analysis_lease_until < now))))
        .values(analysis_state=AnalysisState.RUNNING, analysis_owner=_owner(),
                analysis_lease_until=now + timedelta(seconds=lease_s),
                analysis_attempts=ModelVersion.analysis_attempts + 1)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    return bool(won)


def _end_analysis(session: Session, model: ModelVersion, state: AnalysisState,
                  reason: str | None) -> None:
    """Record how the analysis ended, if this worker still holds it (a worker whose lease
    ran out and was taken over writes nothing)."""
    ended = session.execute(update(ModelVersion).where(
        ModelVersion.id == model.id, ModelVersion.analysis_owner == _owner())
        .values(analysis_state=state, analysis_reason=reason, analysis_lease_until=None)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    log.log(logging.WARNING if state is AnalysisState.FAILED or not ended else logging.INFO,
            "analysis of %s: %s%s%s", model.id, state.value, f" ({reason})" if reason else "",
            "" if ended else "; not recorded: another worker took it over")


@shared_task(name="tinyfleet.reconcile", bind=True, acks_late=True,  # type: ignore[untyped-decorator]
             ignore_result=True)
def reconcile(self: Any) -> dict[str, int]:
    """Start scheduled campaigns, time out offers and installs, re-enqueue stuck jobs."""
    with _session() as session:
        done = J.reconcile(session, enqueue, float(current_app.config["STUCK_AFTER_S"]))
        now = utcnow()
        cut = now - timedelta(seconds=float(current_app.config["STUCK_AFTER_S"]))
        stale = session.scalars(select(ModelVersion.id).where(
            ((ModelVersion.analysis_state == AnalysisState.QUEUED)
             & (ModelVersion.created_at < cut))
            | ((ModelVersion.analysis_state == AnalysisState.RUNNING)
               & (ModelVersion.analysis_lease_until.is_(None)
                  | (ModelVersion.analysis_lease_until < now))))).all()
    if stale:
        done["analyses_reenqueued"] = len(stale)
    if any(done.values()):
        log.info("reconciler: %s", done)
    # Queued while no queue was reachable or lost, or running under a lease that passed
    # (its worker died): the task's claim lets one worker take each.
    for version in stale:
        enqueue(J.ANALYZE_TASK, [version])
    return done


@shared_task(name="tinyfleet.personalize", ignore_result=False)  # type: ignore[untyped-decorator]
def personalize(device_id: str, round_id: int,
                scheme: dict[str, object] | None = None) -> dict[str, object]:
    """Publish a `personalize` command to a device (QoS 1, the process's publisher)."""
    from device_agent import protocol as p
    from workers.bridge import CommandPublisher

    command = p.PersonalizeCommand(round=round_id, scheme=scheme)
    CommandPublisher.for_process().publish(device_id, command)
    return {"device": device_id, "round": round_id}
