"""Installs, refusals with their reasons, self-test failures, rollback, both backends."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.backends import HostBackend, QemuBackend, make_backend, self_test, vector_inputs
from device_agent.errors import BackendError, InstallRefused, SlotError
from device_agent.profile import DeviceProfile
from device_agent.slots import Outcome, SlotStore
from firmware.image import (
    HEADER,
    MAGIC,
    MemoryFigures,
    TestVector,
    generate_signing_key,
    parse_image,
    verify_image,
)
from firmware.int8.serialize import load_quantized
from firmware.pipeline import reference_outputs
from tests.device_agent.images import Images, resign
from tests.firmware.training.fixture_model import inputs, plain_digits

pytestmark = pytest.mark.toolchain


def _store(root: Path, images: Images, backend: str = "host",
           mcu: str = "stm32f746") -> tuple[SlotStore, object]:
    device = DeviceProfile.for_mcu("dev-1", mcu, backend)
    store = SlotStore(root, device, images.key.public_key())
    b = make_backend(device)
    return store, (lambda slot, image: self_test(b, slot, image))


def test_install_switches_slots_and_rollback_returns(images: Images, tmp_path: Path) -> None:
    store, check = _store(tmp_path / "slots", images)
    assert store.install("u1", images.host, check).state is Outcome.INSTALLED
    assert store.state.active == "a" and store.state.previous is None
    v2 = resign(images.host, images.key, model_version="2")
    out = store.install("u2", v2, check)
    assert (out.state, out.slot) == (Outcome.INSTALLED, "b")
    assert store.active_image().manifest.model_version == "2"
    back = store.rollback()
    assert (back.state, back.slot) == (Outcome.ROLLED_BACK, "a")
    # a restart boots what was committed
    again, _ = _store(tmp_path / "slots", images)
    assert again.active_image().manifest.model_version == "1"
    assert again.state.outcome is not None and not again.state.outcome.reported
    again.mark_reported()
    assert _store(tmp_path / "slots", images)[0].state.outcome.reported  # type: ignore[union-attr]


def test_a_failing_self_test_keeps_the_running_slot(images: Images, tmp_path: Path) -> None:
    store, check = _store(tmp_path / "slots", images)
    store.install("u1", images.host, check)
    m = parse_image(images.host).manifest
    wrong = tuple(TestVector(v.input_q, tuple((x + 1) % 128 for x in v.expected))
                  for v in m.test_vectors)
    bad = resign(images.host, images.key, model_version="2", test_vectors=wrong)
    out = store.install("u2", bad, check)
    assert out.state is Outcome.FAILED and "self-test failed" in out.reason
    assert "test vectors differ" in out.reason
    assert store.state.active == "a" and store.active_image().manifest.model_version == "1"
    assert not (store.slot_dir("b") / "image.tfimg").exists()


def _refused(store: SlotStore, check: object, data: bytes) -> str:
    with pytest.raises(InstallRefused) as info:
        store.install("ux", data, check)  # type: ignore[arg-type]
    assert store.state.outcome is not None
    assert store.state.outcome.state is Outcome.REFUSED
    return info.value.reason


def test_tampered_foreign_and_oversized_images_are_refused(images: Images,
                                                           tmp_path: Path) -> None:
    store, check = _store(tmp_path / "slots", images)
    store.install("u1", images.host, check)
    # a changed payload byte: the signature no longer verifies
    tampered = bytearray(images.host)
    tampered[len(tampered) - 200] ^= 0x01
    assert "signature does not verify" in _refused(store, check, bytes(tampered))
    # signed by another key
    other = resign(images.host, generate_signing_key())
    assert "signature does not verify" in _refused(store, check, other)
    # signed, but the payload is not what the manifest's sha256 says
    parsed = parse_image(images.host)
    body = dataclasses.replace(parsed.manifest, payload_sha256="0" * 64).to_json()
    signed = (HEADER.pack(MAGIC, 1, 0, len(body), len(parsed.payload)) + body
              + parsed.payload)
    wrong_hash = signed + images.key.sign(signed)
    assert "does not match the manifest" in _refused(store, check, wrong_hash)
    # built for another MCU core (the qemu device) / another host architecture (host device)
    qstore, qcheck = _store(tmp_path / "q", images, "qemu")
    m4 = resign(images.mcu, images.key, target={"name": "stm32f412", "cpu": "cortex-m4"})
    reason = _refused(qstore, qcheck, m4)
    assert "stm32f412 (cortex-m4)" in reason and "stm32f746 (cortex-m7)" in reason
    arm_host = resign(images.host, images.key, target={"name": "host-aarch64"})
    assert "runs host-x86_64 images" in _refused(store, check, arm_host)
    # does not fit: SRAM, Flash, a slot larger than the device's
    m = parsed.manifest
    big = resign(images.host, images.key, predicted=MemoryFigures(400 * 1024, 1024))
    assert "needs 400.0 kB of SRAM" in _refused(store, check, big)
    assert "has 320.0 kB" in _refused(store, check, big)
    huge = resign(images.host, images.key,
                  measured=MemoryFigures(m.predicted.sram_bytes, 600 * 1024))
    assert "needs 600.0 kB of Flash" in _refused(store, check, huge)
    small, scheck = _store(tmp_path / "small", images, mcu="stm32f103")  # 48 kB slots
    assert "linked for a 496.0 kB slot" in _refused(small, scheck, images.host)
    # nothing of any refusal reached a slot; the running image is untouched
    assert store.state.active == "a" and store.state.pending is None
    assert store.active_image().manifest.model_version == "1"


def test_qemu_refuses_cores_without_an_emulator(images: Images) -> None:
    for mcu, core in (("rp2040", "cortex-m0plus"), ("esp32s3", "xtensa-lx7")):
        with pytest.raises(BackendError, match=f"no QEMU board for {mcu} \\({core}\\)"):
            QemuBackend(DeviceProfile.for_mcu("d", mcu, "qemu"))
    HostBackend(DeviceProfile.for_mcu("d", "rp2040", "host"))  # the host backend runs them


@pytest.mark.parametrize("backend", ["qemu", "host"])
def test_backends_are_bit_exact_against_the_reference(images: Images, tmp_path: Path,
                                                      backend: str) -> None:
    image = images.mcu if backend == "qemu" else images.host
    store, check = _store(tmp_path / "slots", images, backend)
    assert store.install("u1", image, check).state is Outcome.INSTALLED
    parsed = store.active_image()
    qgraph = load_quantized(parsed.manifest.int8_model or b"")
    x = qgraph.input.quantize(inputs(plain_digits().test.images[:24]))
    hwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    b = make_backend(store.device)
    got = b.run(store.active_dir(), parsed, np.concatenate([vector_inputs(parsed), hwc]))
    want = reference_outputs(qgraph, np.concatenate(
        [vector_inputs(parsed).transpose(0, 3, 1, 2), x]))
    np.testing.assert_array_equal(got, want)


def test_a_corrupted_active_slot_falls_back_to_the_previous(images: Images,
                                                            tmp_path: Path) -> None:
    store, check = _store(tmp_path / "slots", images)
    store.install("u1", images.host, check)
    store.install("u2", resign(images.host, images.key, model_version="2"), check)
    path = store.slot_dir("b") / "image.tfimg"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    again, check2 = _store(tmp_path / "slots", images)
    again.recover(check2)  # type: ignore[arg-type]
    assert again.state.active == "a"
    assert again.active_image().manifest.model_version == "1"
    state = json.loads((tmp_path / "slots" / "state.json").read_text())
    assert state["active"] == "a"
    with pytest.raises(SlotError, match="no previous slot"):
        again.rollback()
    verify_image(again.slot_dir("a").joinpath("image.tfimg").read_bytes(),
                 images.key.public_key())
