"""Personalization metrics at the service: stored per device and round, summarized by class.

`record_metrics` is what the bridge's sink calls with each device's metrics message: it is
validated again here (device_agent.protocol's MetricsReport, the same allow-list the device
used) and stored once per (device, round); a re-sent message changes nothing.
`device_metrics` lists a device's rounds; `fleet_summary` groups devices by MCU class and the
model version they ran.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from device_agent import protocol as p
from service.models import Device, DeviceMetric
from service.problems import ApiError, FieldError


def validated(report: p.MetricsReport | bytes | Mapping[str, Any]) -> p.MetricsReport:
    """The report checked against the allow-list; ApiError 422 naming the field otherwise."""
    if isinstance(report, p.MetricsReport):
        data = p.encode(report)
    elif isinstance(report, bytes):
        data = report
    else:
        data = json.dumps(dict(report)).encode()
    try:
        return p.decode_metrics(data)
    except p.ProtocolError as exc:
        raise ApiError(422, f"metrics refused: {exc}",
                       errors=[FieldError("metrics", str(exc))]) from None


def record_metrics(session: Session, device_id: str,
                   report: p.MetricsReport | bytes | Mapping[str, Any],
                   model_version: str | None = None) -> bool:
    """Store one round's metrics (validated again); False when that round is already there."""
    r = validated(report)
    row = DeviceMetric(device_id=device_id, round=r.round, model_version=model_version,
                       samples_used=r.samples_used, accuracy_before=r.accuracy_before,
                       accuracy_after=r.accuracy_after, loss_before=r.loss_before,
                       loss_after=r.loss_after, loss_curve=json.dumps(list(r.loss_curve)),
                       training_memory_bytes=r.training_memory_bytes, duration_s=r.duration_s)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return False
    session.commit()
    return True


def metric_json(m: DeviceMetric) -> dict[str, Any]:
    """One stored round as JSON."""
    return {"round": m.round, "model_version": m.model_version,
            "samples_used": m.samples_used, "accuracy_before": m.accuracy_before,
            "accuracy_after": m.accuracy_after,
            "accuracy_gain": m.accuracy_after - m.accuracy_before,
            "loss_before": m.loss_before, "loss_after": m.loss_after,
            "loss_curve": json.loads(m.loss_curve),
            "training_memory_bytes": m.training_memory_bytes, "duration_s": m.duration_s,
            "kept": m.accuracy_after >= m.accuracy_before,
            "received_at": m.received_at.isoformat()}


def device_metrics(session: Session, device: Device) -> dict[str, Any]:
    """Every round a device reported, oldest first."""
    rows = session.scalars(select(DeviceMetric).where(DeviceMetric.device_id == device.id)
                           .order_by(DeviceMetric.round)).all()
    return {"device": device.id, "name": device.name, "mcu": device.mcu,
            "rounds": [metric_json(m) for m in rows]}


def next_round(session: Session, device_id: str, requested: int | None = None) -> int:
    """The round number of a new `personalize` command to a device, handed out once.

    One past the highest number handed out or reported (`requested`: that number, which
    raises the counter to it when higher). One UPDATE ... RETURNING on the device's row, so
    two commands sent at once never share a number (a device answers a round number it has
    run with that round's metrics again); committed here, before the command is sent.
    """
    reported = (select(func.coalesce(func.max(DeviceMetric.round), 0))
                .where(DeviceMetric.device_id == device_id).scalar_subquery())
    counter = Device.personalize_round
    highest = case((counter >= reported, counter), else_=reported)
    value = (highest + 1 if requested is None
             else case((highest >= requested, highest), else_=requested))
    handed = session.execute(update(Device).where(Device.id == device_id)
                             .values(personalize_round=value)
                             .returning(Device.personalize_round)
                             .execution_options(synchronize_session=False)).scalar_one()
    session.commit()
    return int(handed) if requested is None else requested


def fleet_summary(session: Session) -> dict[str, Any]:
    """Per (MCU class, model version): devices, rounds, mean accuracy before/after, gain."""
    stmt = (select(Device.mcu, DeviceMetric.model_version,
                   func.count(func.distinct(DeviceMetric.device_id)),
                   func.count(DeviceMetric.id), func.avg(DeviceMetric.accuracy_before),
                   func.avg(DeviceMetric.accuracy_after),
                   func.sum(case((DeviceMetric.accuracy_after < DeviceMetric.accuracy_before, 1),
                                 else_=0)),
                   func.max(DeviceMetric.training_memory_bytes))
            .join(Device, Device.id == DeviceMetric.device_id)
            .group_by(Device.mcu, DeviceMetric.model_version)
            .order_by(Device.mcu, DeviceMetric.model_version))
    groups = []
    for mcu, version, devices, rounds, before, after, rolled_back, memory in session.execute(stmt):
        groups.append({"mcu": mcu, "model_version": version, "devices": int(devices),
                       "rounds": int(rounds), "rolled_back": int(rolled_back or 0),
                       "mean_accuracy_before": float(before), "mean_accuracy_after": float(after),
                       "mean_gain": float(after) - float(before),
                       "max_training_memory_bytes": int(memory)})
    return {"groups": groups}
