"""Personalization rounds on shifted local digits: gains, the overlay served bit-exact by both
backends, restarts, a worse round rolled back, refusals of schemes the firmware cannot hold."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from device_agent.backends import make_backend, self_test
from device_agent.errors import AgentError
from device_agent.local_data import load_local, write_device_data
from device_agent.personalization import Personalizer
from device_agent.profile import DeviceProfile
from device_agent.slots import Outcome, SlotStore
from firmware.int8.serialize import load_quantized
from firmware.pipeline import reference_outputs
from firmware.training.scheme import SparseUpdateScheme, WeightUpdate
from tests.device_agent.images import SCHEME, Images

pytestmark = pytest.mark.toolchain


def _device(tmp: Path, images: Images, backend: str, index: int = 1) -> Personalizer:
    device = DeviceProfile.for_mcu(f"dev-{index}", "stm32f746", backend)
    store = SlotStore(tmp / "slots", device, images.key.public_key())
    b = make_backend(device)
    image = images.mcu if backend == "qemu" else images.host
    if store.state.active is None:
        out = store.install("u1", image, lambda slot, img: self_test(b, slot, img))
        assert out.state is Outcome.INSTALLED
    if not (tmp / "data").exists():
        write_device_data(tmp / "data", index)
    return Personalizer(store, b, tmp / "data")


def _held_out(p: Personalizer) -> np.ndarray:
    from firmware.data import Split
    from firmware.personalize import int8_samples

    data = load_local(p.data_dir)
    return int8_samples(p.current_graph(), Split(data.test.images, data.test.labels)).images


@pytest.mark.parametrize("backend", ["host", "qemu"])
def test_a_round_improves_accuracy_and_the_overlay_serves_bit_exact(
        images: Images, tmp_path: Path, backend: str) -> None:
    p = _device(tmp_path, images, backend)
    base = load_quantized(p.store.active_image().manifest.int8_model or b"")
    x = _held_out(p)[:24]
    before = p.infer(x)
    np.testing.assert_array_equal(before, reference_outputs(base, x.transpose(0, 3, 1, 2)))

    result = p.run_round(1)
    m = result.metrics
    assert result.kept and result.overlay_round == 1
    assert m.accuracy_after >= m.accuracy_before + 0.15, m
    assert m.loss_after < m.loss_before
    assert m.samples_used > 100 and 0 < len(m.loss_curve) <= 50
    assert m.training_memory_bytes > 0
    updated = p.current_graph()
    after = p.infer(x)
    np.testing.assert_array_equal(after, reference_outputs(updated, x.transpose(0, 3, 1, 2)))
    assert not np.array_equal(after, before)
    assert p.boot_check() is None  # the recomputed self-test vectors pass

    # a restart: the overlay is read back, checked, and served
    again = _device(tmp_path, images, backend)
    assert again.describe()["overlay_round"] == 1
    assert again.boot_check() is None
    np.testing.assert_array_equal(again.infer(x), after)


def test_a_round_that_makes_accuracy_worse_is_rolled_back(images: Images,
                                                          tmp_path: Path) -> None:
    p = _device(tmp_path, images, "host", index=2)
    assert p.run_round(1).kept
    kept = p.describe()
    x = _held_out(p)[:16]
    served = p.infer(x)
    wild = dataclasses.replace(SCHEME, lr=50.0)
    result = p.run_round(2, wild)
    assert not result.kept and result.overlay_round == 1
    assert result.metrics.accuracy_after < result.metrics.accuracy_before
    assert p.describe() == kept
    np.testing.assert_array_equal(p.infer(x), served)


def test_a_scheme_beyond_the_overlay_is_refused(images: Images, tmp_path: Path) -> None:
    p = _device(tmp_path, images, "host")
    wider = SparseUpdateScheme(bias_layers=6, weights=(WeightUpdate("expand", 1.0),))
    with pytest.raises(AgentError, match="cannot overlay"):
        p.run_round(1, wider)
    assert p.describe()["overlay_round"] is None


def test_a_torn_overlay_record_is_refused_not_served(images: Images, tmp_path: Path) -> None:
    p = _device(tmp_path, images, "host")
    assert p.run_round(1, epochs=0.3).kept
    path = p.store.active_dir() / "overlay.json"
    text = path.read_text()
    sha = p.describe()["overlay_sha256"]
    path.write_text(text.replace(sha, "0" * 64))
    with pytest.raises(AgentError, match="do not match their sha256"):
        p.infer(_held_out(p)[:2])
