"""workers.offers: an artifact's offer summary read once per process, per-job fields fresh."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from device_agent import protocol as p
from firmware.image import generate_signing_key
from tests.ota_fleet import signed_image
from workers.artifacts import ArtifactStore
from workers.offers import offer_for

pytestmark = pytest.mark.unit


class CountingStore(ArtifactStore):
    """An ArtifactStore that counts whole-artifact reads."""

    reads = 0

    def read(self, sha256: str) -> bytes:
        self.reads += 1
        return super().read(sha256)


def test_an_offer_is_the_images_summary_with_its_own_update_and_deadlines(
        tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "artifacts")
    image = signed_image(generate_signing_key(), "stm32f412", 9000, seed=7)
    sha = store.put(image)
    before = time.time()
    first = offer_for(store, sha, "u1", block_size=4096, offer_deadline_s=30,
                      install_deadline_s=600)
    second = offer_for(store, sha, "u2", block_size=4096, offer_deadline_s=5,
                       install_deadline_s=60)
    assert store.reads == 1  # the second offer of the artifact reads nothing
    expected = p.make_offer("u1", image, block_size=4096)
    fields = ("model_id", "target_mcu", "target_cpu", "predicted_sram_bytes", "image_bytes",
              "image_sha256", "signature", "block_count")
    assert all(getattr(first, f) == getattr(expected, f) == getattr(second, f) for f in fields)
    assert (first.update_id, second.update_id) == ("u1", "u2")
    assert first.offer_deadline is not None and first.install_deadline is not None
    assert second.offer_deadline is not None and second.install_deadline is not None
    assert before + 30 <= first.offer_deadline <= time.time() + 30
    assert first.install_deadline - first.offer_deadline == pytest.approx(600)
    assert second.install_deadline - second.offer_deadline == pytest.approx(60)
    # Another block size is another summary (the block count differs).
    other = offer_for(store, sha, "u3", block_size=1024, offer_deadline_s=5,
                      install_deadline_s=60)
    assert other.block_count == -(-len(image) // 1024) and store.reads == 2
    # What goes on the wire validates as an offer.
    assert p.decode_command(p.encode(second)) == second
