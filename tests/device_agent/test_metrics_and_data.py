"""The metrics allow-list (numbers only, validated both ways) and per-device local data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.errors import AgentError
from device_agent.local_data import load_local, write_device_data
from device_agent.protocol import MetricsReport, ProtocolError, decode_metrics, encode
from firmware.data import device_shift, device_slice, digits

pytestmark = pytest.mark.unit

GOOD = {"round": 3, "samples_used": 320, "accuracy_before": 0.2, "accuracy_after": 0.6,
        "loss_before": 2.1, "loss_after": 1.2, "loss_curve": [2.0, 1.5, 1.2],
        "training_memory_bytes": 4096, "duration_s": 2.5}


def test_metrics_round_trip_through_the_protocol() -> None:
    report = MetricsReport(**{**GOOD, "loss_curve": (2.0, 1.5, 1.2)})  # type: ignore[arg-type]
    assert decode_metrics(encode(report)) == report
    assert json.loads(encode(report)) == GOOD


@pytest.mark.parametrize(("change", "field"), [
    ({"label_counts": [3, 4]}, "label_counts"),
    ({"features": "AAAA"}, "features"),
    ({"round": True}, "round"),
    ({"samples_used": -1}, "samples_used"),
    ({"accuracy_after": 1.5}, "accuracy_after"),
    ({"loss_curve": [0.1] * 51}, "loss_curve"),
])
def test_anything_outside_the_allow_list_is_refused(change: dict[str, object],
                                                    field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_metrics(json.dumps({**GOOD, **change}).encode())
    assert field in str(info.value)


def test_devices_get_different_shifted_slices_of_the_device_half(tmp_path: Path) -> None:
    base = digits()
    a, b = device_slice(base, 0, size=16), device_slice(base, 1, size=16)
    assert device_shift(0) != device_shift(1)
    assert a.train.images.shape[2:] == (16, 16)
    counts = np.bincount(np.concatenate([a.train.labels, a.val.labels, a.test.labels]),
                         minlength=10)
    rare = device_shift(0).rare_classes
    common = [c for c in range(10) if c not in rare]
    assert counts[list(rare)].max() < counts[common].min() / 2  # class imbalance
    assert not np.array_equal(a.train.images[:5], b.train.images[:5])
    path = write_device_data(tmp_path / "d0", 0)
    loaded = load_local(path.parent)
    total = len(loaded.train) + len(loaded.val) + len(loaded.test)
    assert total == len(a.train) + len(a.val) + len(a.test)
    with pytest.raises(AgentError, match="does not exist"):
        load_local(tmp_path / "missing")
    (tmp_path / "d0" / "second.npz").write_bytes(path.read_bytes())
    with pytest.raises(AgentError, match=r"holds 2 \.npz files"):
        load_local(tmp_path / "d0")
