"""The tables: fleets, devices (with tags), API tokens, idempotency keys; model versions,
campaigns, deployment jobs and their events, per-class plans and builds, signed artifacts."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false

from service.db import Base


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Role(enum.Enum):
    """API token roles, each including the rights of the ones before it."""

    VIEWER = "viewer"  # read
    OPERATOR = "operator"  # register devices, start campaigns
    ADMIN = "admin"  # tokens, decommissioning

    @property
    def rank(self) -> int:
        """Position in viewer < operator < admin."""
        return _ROLE_RANK[self]

    def allows(self, needed: Role) -> bool:
        """True when this role has at least the rights of `needed`."""
        return self.rank >= needed.rank


_ROLE_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class DeviceState(enum.Enum):
    """Registry state of a device (connectivity is reported separately, over MQTT)."""

    ACTIVE = "active"
    DECOMMISSIONED = "decommissioned"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Store the lowercase values (what the API shows), as VARCHAR with a CHECK constraint.
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=20,
                values_callable=lambda e: [m.value for m in e])


class Fleet(Base):
    """A group of devices sharing one Ed25519 firmware-signing key."""

    __tablename__ = "fleets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    signing_public_key: Mapped[str] = mapped_column(Text)  # PEM, SubjectPublicKeyInfo
    signing_key_path: Mapped[str] = mapped_column(Text)  # PEM PKCS#8 file, mode 0600
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    devices: Mapped[list[Device]] = relationship(back_populates="fleet")


class Device(Base):
    """One MCU in the field. `id` is also its MQTT username."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    fleet_id: Mapped[int] = mapped_column(ForeignKey("fleets.id"))
    mcu: Mapped[str] = mapped_column(String(32))  # catalog name, or "custom"
    cpu: Mapped[str] = mapped_column(String(20))  # firmware.targets.Cpu value
    sram_bytes: Mapped[int] = mapped_column(Integer)
    flash_bytes: Mapped[int] = mapped_column(Integer)
    slot_bytes: Mapped[int] = mapped_column(Integer)  # Flash one firmware image may use
    ota_layout: Mapped[str] = mapped_column(String(10))  # firmware.targets.OtaLayout value
    state: Mapped[DeviceState] = mapped_column(_enum(DeviceState, "device_state"),
                                               default=DeviceState.ACTIVE)
    # Mosquitto's own PBKDF2-SHA512 format ($7$...); None once decommissioned.
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(160))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    decommissioned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What OTA put on it (the device's own reports, through the MQTT bridge).
    installed_model_version: Mapped[str | None] = mapped_column(String(16))
    installed_artifact: Mapped[str | None] = mapped_column(String(64))  # signed image sha256
    installed_slot: Mapped[str | None] = mapped_column(String(8))
    update_state: Mapped[str | None] = mapped_column(String(20))  # last OTA event's state
    online: Mapped[bool] = mapped_column(Boolean, default=False,  # MQTT presence
                                         server_default=false())
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What its agent's backend runs, from its presence: "qemu" (images for its MCU), or
    # "host-x86_64" etc. (the host backend's library images); None: it did not say (qemu).
    backend: Mapped[str | None] = mapped_column(String(40))
    # The highest personalization round number handed out to it (service.personalization.
    # next_round increments it in one UPDATE, so two commands never share a number).
    personalize_round: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    fleet: Mapped[Fleet] = relationship(back_populates="devices", lazy="joined")
    tag_rows: Mapped[list[DeviceTag]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="DeviceTag.tag")

    # One index per combination of the list filters, each ending in `id`: a filtered page
    # (ordered by id, after a cursor) is one range of one index, never a sort of every match.
    __table_args__ = (
        Index("ix_devices_fleet_id", "fleet_id", "id"),
        Index("ix_devices_mcu_id", "mcu", "id"),
        Index("ix_devices_state_id", "state", "id"),
        Index("ix_devices_fleet_mcu_id", "fleet_id", "mcu", "id"),
        Index("ix_devices_fleet_state_id", "fleet_id", "state", "id"),
        Index("ix_devices_mcu_state_id", "mcu", "state", "id"),
        Index("ix_devices_fleet_mcu_state_id", "fleet_id", "mcu", "state", "id"),
    )
    @property
    def fleet_name(self) -> str:
        """The name of the device's fleet."""
        return self.fleet.name

    @property
    def tags(self) -> list[str]:
        """The device's tags, sorted."""
        return [row.tag for row in self.tag_rows]

    @property
    def mqtt_username(self) -> str:
        """The MQTT username: the device id."""
        return self.id


class DeviceTag(Base):
    """One tag of one device (a table, not a JSON column, so filters use an index)."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    # (tag, device_id) covers "devices with tag X": the filter never touches the table.
    __table_args__ = (Index("ix_device_tags_tag_device", "tag", "device_id"),)


class ApiToken(Base):
    """An API bearer token; only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[Role] = mapped_column(_enum(Role, "token_role"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to recognise a token
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # None: never


class IdempotencyState(enum.Enum):
    """Progress of a request sent with an Idempotency-Key."""

    IN_PROGRESS = "in_progress"
    DONE = "done"


class IdempotencyKey(Base):
    """A bulk request's Idempotency-Key and what it did (kept 24 h).

    Only device ids are kept, never passwords: a retry gets the same devices with passwords
    rotated again.
    """

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(32))  # the route, e.g. "devices.bulk"
    key: Mapped[str] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[IdempotencyState] = mapped_column(_enum(IdempotencyState, "idempotency_state"))
    device_ids: Mapped[str | None] = mapped_column(Text)  # JSON list, in answer order
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("scope", "key", name="uq_idempotency_keys_scope_key"),
        Index("ix_idempotency_keys_created_at", "created_at"),
    )


# ---- OTA: model versions, campaigns, jobs -----------------------------------------------

class ModelKind(enum.Enum):
    """What a registered model version is (firmware.deploy.ModelKind's values)."""

    FAMILY = "family"
    ONNX = "onnx"


class AnalysisState(enum.Enum):
    """A family version's contribution analysis (on-device training needs it)."""

    NONE = "none"  # not applicable (a fixed ONNX model)
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ModelVersion(Base):
    """An immutable, content-addressed model version (`id`: 16 hex digits of sha256)."""

    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[ModelKind] = mapped_column(_enum(ModelKind, "model_kind"))
    path: Mapped[str] = mapped_column(Text)  # under VAR_DIR/models/<id>
    size_bytes: Mapped[int] = mapped_column(Integer)
    analysis_state: Mapped[AnalysisState] = mapped_column(_enum(AnalysisState,
                                                                "analysis_state"))
    analysis_reason: Mapped[str | None] = mapped_column(Text)
    # The running analysis's claim, renewed by its worker; past it, another takes over.
    analysis_owner: Mapped[str | None] = mapped_column(String(64))
    analysis_lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    analysis_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    info: Mapped[str] = mapped_column(Text, default="{}")  # JSON summary (space, classes...)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CampaignState(enum.Enum):
    """A campaign's life: scheduled -> running -> completed | waiting-offline -> closed;
    paused / halted (failures over the limit) / aborted / rolled-back on the way."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    ABORTED = "aborted"
    WAITING_OFFLINE = "waiting-offline"
    COMPLETED = "completed"
    CLOSED = "closed"
    ROLLED_BACK = "rolled-back"


ACTIVE_CAMPAIGN_STATES = (CampaignState.SCHEDULED, CampaignState.RUNNING,
                          CampaignState.PAUSED, CampaignState.HALTED,
                          CampaignState.WAITING_OFFLINE)


class Campaign(Base):
    """One rollout of a model version to a snapshot of devices."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    state: Mapped[CampaignState] = mapped_column(_enum(CampaignState, "campaign_state"))
    selector: Mapped[str] = mapped_column(Text)  # JSON, as given
    canary_percent: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer)
    max_failure_percent: Mapped[float] = mapped_column(Float)
    personalize: Mapped[bool] = mapped_column(Boolean)
    offer_deadline_s: Mapped[int] = mapped_column(Integer)
    install_deadline_s: Mapped[int] = mapped_column(Integer)
    start_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    batch_count: Mapped[int] = mapped_column(Integer)
    current_batch: Mapped[int] = mapped_column(Integer, default=-1)  # -1: none released
    halt_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_campaigns_state", "state"),)


class JobState(enum.Enum):
    """A DeploymentJob's state; see service.campaigns.jobs for the transitions."""

    PENDING = "pending"  # its batch is not released yet
    QUEUED = "queued"
    PLANNING = "planning"
    BUILDING = "building"
    OFFERING = "offering"
    WAITING_OFFLINE = "waiting-offline"  # built; offered when the device comes online
    OFFERED = "offered"
    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"  # verifying, installing, self-test
    INSTALLED = "installed"
    FAILED = "failed"
    SKIPPED = "skipped"
    ABORTED = "aborted"
    ROLLBACK_SENT = "rollback-sent"
    ROLLED_BACK = "rolled-back"
    CLOSED = "closed"  # still offline when the operator closed the campaign


class DeploymentJob(Base):
    """One device's part in one campaign."""

    __tablename__ = "deployment_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    fleet_id: Mapped[int] = mapped_column(ForeignKey("fleets.id"))
    batch: Mapped[int] = mapped_column(Integer)  # 0: the canary batch
    hw_class: Mapped[str] = mapped_column(String(96))
    hw: Mapped[str] = mapped_column(Text)  # JSON of firmware.deploy.HardwareClass
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"))
    reason: Mapped[str | None] = mapped_column(Text)
    emulated: Mapped[bool | None] = mapped_column(Boolean)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    update_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    progress: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    state_changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                       default=utcnow)
    offered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("campaign_id", "device_id", name="uq_jobs_campaign_device"),
        Index("ix_jobs_campaign_state", "campaign_id", "state"),
        Index("ix_jobs_device_state", "device_id", "state"),
        Index("ix_jobs_state_changed", "state", "state_changed_at"),
    )


class JobEvent(Base):
    """Every state change of a job, with its time and who made it."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("deployment_jobs.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))  # worker, device, operator, reconciler
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_job_events_job", "job_id", "id"),)


class WorkState(enum.Enum):
    """A cached plan's or build's progress."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class _ClassWork:
    """What a plan and a build for one (model version, hardware class) share: the claim
    (a unique row, then a lease its owner renews) and the outcome (state, reason, time)."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    hw_class: Mapped[str] = mapped_column(String(96))
    state: Mapped[WorkState] = mapped_column(_enum(WorkState, "work_state"))
    reason: Mapped[str | None] = mapped_column(Text)  # why nothing fits / what failed
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    owner: Mapped[str | None] = mapped_column(String(64))
    from_cache: Mapped[bool] = mapped_column(Boolean, default=False)
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ClassPlan(_ClassWork, Base):
    """The search for one (model version, hardware class): at most one, ever."""

    __tablename__ = "class_plans"

    result: Mapped[str | None] = mapped_column(Text)  # JSON of firmware.deploy.plan_class

    __table_args__ = (UniqueConstraint("model_version_id", "hw_class",
                                       name="uq_class_plans_version_class"),)


class ClassBuild(_ClassWork, Base):
    """The unsigned build for one (model version, hardware class): at most one, ever."""

    __tablename__ = "class_builds"

    payload_sha256: Mapped[str | None] = mapped_column(String(64))  # in the ArtifactStore
    manifest: Mapped[str | None] = mapped_column(Text)  # canonical manifest JSON
    emulated: Mapped[bool | None] = mapped_column(Boolean)
    report: Mapped[str | None] = mapped_column(Text)
    # The same C as a host shared library (the `host` backend's image), unsigned; None with
    # `host_reason` when its build failed.
    host_target: Mapped[str | None] = mapped_column(String(40))  # e.g. host-x86_64
    host_payload_sha256: Mapped[str | None] = mapped_column(String(64))
    host_manifest: Mapped[str | None] = mapped_column(Text)
    host_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("model_version_id", "hw_class",
                                       name="uq_class_builds_version_class"),)


class SignedArtifact(Base):
    """A build signed with one fleet's key: at most one per (build, fleet)."""

    __tablename__ = "signed_artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("class_builds.id"))
    fleet_id: Mapped[int] = mapped_column(ForeignKey("fleets.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    host_sha256: Mapped[str | None] = mapped_column(String(64))  # the signed host image
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("build_id", "fleet_id",
                                       name="uq_signed_artifacts_build_fleet"),)

class DeviceMetric(Base):
    """One personalization round's metrics from one device (device_agent.protocol's
    MetricsReport: numbers only, validated again before they are stored)."""

    __tablename__ = "device_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    round: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str | None] = mapped_column(String(128))  # installed, when known
    samples_used: Mapped[int] = mapped_column(Integer)
    accuracy_before: Mapped[float] = mapped_column(Float)
    accuracy_after: Mapped[float] = mapped_column(Float)
    loss_before: Mapped[float] = mapped_column(Float)
    loss_after: Mapped[float] = mapped_column(Float)
    loss_curve: Mapped[str] = mapped_column(Text)  # JSON list of at most 50 numbers
    training_memory_bytes: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("device_id", "round", name="uq_device_metrics_device_round"),
    )
