"""The personalization page's data: the fleet's accuracy gain per round as a distribution,
by MCU class and model version, beside `service.personalization.fleet_summary`.

Only the metrics devices reported are read (numbers: accuracy before and after, loss,
samples, memory, time); no raw data exists at the service to show. The distribution is
counted in the database, in bins of `BIN_WIDTH` of gain (one GROUP BY, whatever the fleet's
size), so the page never loads one row per device.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.orm import Session

from service.models import Device, DeviceMetric
from service.personalization import fleet_summary

BIN_WIDTH = 0.02  # accuracy gain (fraction of samples): 2 percentage points per bin


def gain_by_round(session: Session) -> list[dict[str, Any]]:
    """Per (MCU, model version, round): devices, mean/min/max gain, and binned counts."""
    gain = DeviceMetric.accuracy_after - DeviceMetric.accuracy_before
    # floor() for negative gains too: cast truncates toward zero, so shift by a whole number.
    shift = 1000
    bin_index = cast((gain / BIN_WIDTH) + shift, Integer) - shift
    stats = (select(Device.mcu, DeviceMetric.model_version, DeviceMetric.round, func.count(),
                    func.avg(gain), func.min(gain), func.max(gain),
                    func.avg(DeviceMetric.accuracy_before), func.avg(DeviceMetric.accuracy_after))
             .join(Device, Device.id == DeviceMetric.device_id)
             .group_by(Device.mcu, DeviceMetric.model_version, DeviceMetric.round))
    groups: dict[tuple[str, str | None, int], dict[str, Any]] = {}
    for mcu, version, round_, n, mean, low, high, before, after in session.execute(stats):
        groups[(mcu, version, round_)] = {
            "mcu": mcu, "model_version": version, "round": int(round_), "devices": int(n),
            "mean_gain": float(mean), "min_gain": float(low), "max_gain": float(high),
            "mean_accuracy_before": float(before), "mean_accuracy_after": float(after),
            "bins": {}}
    bins = (select(Device.mcu, DeviceMetric.model_version, DeviceMetric.round,
                   bin_index.label("bin"), func.count())
            .join(Device, Device.id == DeviceMetric.device_id)
            .group_by(Device.mcu, DeviceMetric.model_version, DeviceMetric.round, "bin"))
    for mcu, version, round_, index, n in session.execute(bins):
        # The bin's lower edge as a gain; keys are strings for JSON.
        groups[(mcu, version, round_)]["bins"][f"{int(index) * BIN_WIDTH:.2f}"] = int(n)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], k[1] or "", k[2]))]


def personalization_json(session: Session) -> dict[str, Any]:
    """What the page shows and polls: the summary groups and the per-round distribution."""
    return {"groups": fleet_summary(session)["groups"], "rounds": gain_by_round(session),
            "bin_width": BIN_WIDTH}
