"""Personalization rounds: sparse fine-tuning on local data, kept as a weights overlay.

A round (`Personalizer.run_round`) on the active slot's image:
  1. the scheme: the command's, else the manifest's `sparse_update`; its trainable layers must
     be the image's overlay layers (the firmware can only redirect those);
  2. the graph: the manifest's int8 graph (firmware.int8.serialize), or the last kept round's;
  3. fine-tune (firmware.training.finetune) on the local train split; evaluate before and
     after on the held-out test split with the int8 reference (what the firmware computes);
  4. worse accuracy after than before: the round is rolled back (nothing is written);
  5. otherwise the overlay (firmware.codegen.overlay, tagged with the round) is run on the
     backend over the test vectors and held-out inputs and must equal firmware.reference on
     the updated graph bit for bit; the vectors' new outputs become the local self-test;
  6. commit: the updated graph, then `overlay.json` (the overlay, its sha256, the round, the
     recomputed self-test outputs, the image it belongs to), each written durably.
The overlay survives restarts; an image installed later has its own (none at first).
Only numbers leave: the round's MetricsReport.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device_agent.backends import Backend, self_test, vector_inputs
from device_agent.errors import AgentError, BackendError
from device_agent.local_data import load_local
from device_agent.protocol import MetricsReport
from device_agent.slots import SlotStore, sha256_hex
from firmware.codegen.overlay import (
    OverlayError,
    OverlayLayout,
    encode_overlay,
    overlay_layout,
    overlay_round,
)
from firmware.errors import EmulationError
from firmware.image import FirmwareImage
from firmware.int8.quantize import QuantizedGraph
from firmware.int8.serialize import dump_quantized, load_quantized
from firmware.pipeline import reference_outputs
from firmware.training.finetune import finetune
from firmware.training.samples import Samples
from firmware.training.scheme import SparseUpdateScheme, resolve

OVERLAY_FILE = "overlay.json"
OVERLAY_FORMAT = "tinyfleet.overlay-record"
CHECK_INPUTS = 16  # held-out inputs run through the backend with a new overlay


@dataclass(frozen=True)
class OverlayRecord:
    """overlay.json: the kept overlay of one image."""

    round: int
    image_sha256: str
    overlay: bytes
    overlay_sha256: str
    graph_file: str
    graph_sha256: str
    expected: tuple[tuple[int, ...], ...]  # the test vectors' outputs with the overlay

    def to_json(self) -> bytes:
        """The file's bytes."""
        return (json.dumps({
            "format": OVERLAY_FORMAT, "round": self.round, "image_sha256": self.image_sha256,
            "overlay_b64": base64.b64encode(self.overlay).decode(),
            "overlay_sha256": self.overlay_sha256, "graph_file": self.graph_file,
            "graph_sha256": self.graph_sha256,
            "expected": [list(v) for v in self.expected]}, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> OverlayRecord:
        """Parse overlay.json; AgentError if it is not one."""
        try:
            doc = json.loads(data)
            if doc["format"] != OVERLAY_FORMAT:
                raise AgentError(f"{OVERLAY_FILE}: format {doc['format']!r}")
            return cls(round=int(doc["round"]), image_sha256=str(doc["image_sha256"]),
                       overlay=base64.b64decode(doc["overlay_b64"], validate=True),
                       overlay_sha256=str(doc["overlay_sha256"]),
                       graph_file=str(doc["graph_file"]), graph_sha256=str(doc["graph_sha256"]),
                       expected=tuple(tuple(int(x) for x in v) for v in doc["expected"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError(f"{OVERLAY_FILE} is unreadable: {exc!r}") from None


@dataclass(frozen=True)
class RoundResult:
    """What a round did: kept or rolled back, and its metrics (numbers only)."""

    kept: bool
    metrics: MetricsReport
    overlay_round: int | None  # the overlay in use after the round


def int8_logits(qgraph: QuantizedGraph, images_hwc: npt.NDArray[np.int8]
                ) -> npt.NDArray[np.int8]:
    """The int8 outputs (N, C*H*W, in C, H, W order) of HWC inputs, batched.

    The training engine's batched forward (firmware.training.engine.int8_forward): equal to
    firmware.int8.reference bit for bit, one call per layer for the whole batch.
    """
    from firmware.training.engine.int8_forward import forward_batch

    graph = qgraph.graph
    env = {graph.input: np.ascontiguousarray(images_hwc)}
    for ql in qgraph.ordered_layers():
        env[ql.layer.output] = forward_batch(qgraph, ql, [env[t] for t in ql.layer.inputs])
    out = env[graph.output]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)).reshape(len(out), -1)


def _held_out_loss(qgraph: QuantizedGraph, samples: Samples) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the int8 graph on samples, logits dequantized."""
    logits = qgraph.output.dequantize(int8_logits(qgraph, samples.images)).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    labels = np.asarray(samples.labels)
    loss = float(-log_p[np.arange(len(labels)), labels].mean())
    return float(np.mean(logits.argmax(1) == labels)), loss


def _int8_samples(qgraph: QuantizedGraph, images: npt.NDArray[np.uint8],
                  labels: npt.NDArray[np.int64]) -> Samples:
    from firmware.data import Split
    from firmware.personalize import int8_samples

    return int8_samples(qgraph, Split(images, labels))


class Personalizer:
    """Rounds and the overlay of one device (module docstring)."""

    def __init__(self, store: SlotStore, backend: Backend, data_dir: Path) -> None:
        self.store = store
        self.backend = backend
        self.data_dir = data_dir

    # -- the image and its overlay ----------------------------------------------------------

    def _trainable_image(self) -> tuple[FirmwareImage, OverlayLayout, QuantizedGraph]:
        image = self.store.active_image()
        m = image.manifest
        if m.sparse_update is None or m.int8_model is None or m.overlay is None:
            raise AgentError(f"image {m.model_id} v{m.model_version} was not built for "
                             "personalization (no sparse-update scheme, overlay region or "
                             "int8 graph in its manifest)")
        base = load_quantized(m.int8_model)
        layout = overlay_layout(base, m.overlay.layers)
        if (layout.layout_id, layout.body_bytes) != (m.overlay.layout_id, m.overlay.body_bytes):
            raise AgentError(f"image {m.model_id} v{m.model_version}: its overlay layout "
                             f"{m.overlay.layout_id:#010x} is not its graph's "
                             f"{layout.layout_id:#010x}")
        return image, layout, base

    def _record_path(self) -> Path:
        return self.store.active_dir() / OVERLAY_FILE

    def record(self) -> OverlayRecord | None:
        """The kept overlay of the active image, checked (sha256, crc32, layout), or None."""
        path = self._record_path()
        if not path.exists() or self.store.state.active is None:
            return None
        record = OverlayRecord.from_json(path.read_bytes())
        info = self.store.state.slot(self.store.state.active)
        if info is None or record.image_sha256 != info.sha256:
            return None  # left by an image that used this slot before
        if sha256_hex(record.overlay) != record.overlay_sha256:
            raise AgentError(f"{path}: overlay bytes do not match their sha256")
        _, layout, _ = self._trainable_image()
        try:
            overlay_round(record.overlay, layout)
        except OverlayError as exc:
            raise AgentError(f"{path}: {exc}") from None
        return record

    def overlay(self) -> bytes | None:
        """The overlay the backend should load with the active image (None: none kept)."""
        image = self.store.active_image()
        if image.manifest.overlay is None:
            return None
        record = self.record()
        return None if record is None else record.overlay

    def current_graph(self) -> QuantizedGraph:
        """The int8 graph the device runs now: the last kept round's, else the image's."""
        _, _, base = self._trainable_image()
        record = self.record()
        if record is None:
            return base
        data = (self.store.active_dir() / record.graph_file).read_bytes()
        if sha256_hex(data) != record.graph_sha256:
            raise AgentError(f"{record.graph_file} does not match its sha256")
        return load_quantized(data)

    def boot_check(self) -> str | None:
        """Self-test of the active image with its overlay and the recomputed outputs."""
        record = self.record() if self.store.active_image().manifest.overlay else None
        image = self.store.active_image()
        if record is None:
            return self_test(self.backend, self.store.active_dir(), image)
        return self_test(self.backend, self.store.active_dir(), image, record.overlay,
                         np.asarray(record.expected))

    def infer(self, images_hwc: npt.NDArray[np.int8]) -> npt.NDArray[np.int8]:
        """The device's outputs for int8 HWC inputs (the overlay in use)."""
        return self.backend.run(self.store.active_dir(), self.store.active_image(),
                                images_hwc, self.overlay())

    # -- a round ----------------------------------------------------------------------------

    def run_round(self, round_id: int, scheme: SparseUpdateScheme | None = None,
                  epochs: float = 1.0, seed: int = 0) -> RoundResult:
        """One personalization round (module docstring)."""
        started = time.monotonic()
        image, layout, _ = self._trainable_image()
        m = image.manifest
        assert m.sparse_update is not None
        chosen = scheme or SparseUpdateScheme.from_dict(m.sparse_update)
        current = self.current_graph()
        trainable = set(resolve(chosen, current.graph).trainable)
        if not trainable <= set(layout.layers):
            extra = sorted(trainable - set(layout.layers))
            raise AgentError(f"the scheme trains {extra}, which the firmware of {m.model_id} "
                             f"v{m.model_version} cannot overlay (it overlays "
                             f"{list(layout.layers)})")
        data = load_local(self.data_dir)
        train = _int8_samples(current, data.train.images, data.train.labels)
        test = _int8_samples(current, data.test.images, data.test.labels)
        acc_before, loss_before = _held_out_loss(current, test)
        result = finetune(current, chosen, train, test, epochs=epochs, seed=seed)
        trained = result.trained
        acc_after, loss_after = _held_out_loss(trained, test)
        kept = acc_after >= acc_before
        if kept:
            self._commit(image, layout, trained, round_id, test)
        record = self.record()
        metrics = MetricsReport(
            round=round_id, samples_used=len(train), accuracy_before=acc_before,
            accuracy_after=acc_after, loss_before=loss_before, loss_after=loss_after,
            loss_curve=tuple(min(v, 1e9) for v in result.loss_curve),
            training_memory_bytes=result.memory.training_bytes,
            duration_s=time.monotonic() - started)
        return RoundResult(kept=kept, metrics=metrics,
                           overlay_round=None if record is None else record.round)

    def _commit(self, image: FirmwareImage, layout: OverlayLayout, trained: QuantizedGraph,
                round_id: int, test: Samples) -> None:
        m = image.manifest
        assert m.overlay is not None
        overlay = encode_overlay(trained, layout, round_id)
        overlay_round(overlay, layout)
        if len(overlay) > m.overlay.region_bytes:
            raise AgentError(f"overlay of {len(overlay)} bytes does not fit the "
                             f"{m.overlay.region_bytes}-byte region")
        vectors = vector_inputs(image)
        held_out = test.images[:CHECK_INPUTS]
        batch = np.concatenate([vectors, held_out])
        want = reference_outputs(trained, np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
        slot_dir = self.store.active_dir()
        try:
            got = self.backend.run(slot_dir, image, batch, overlay)
        except (EmulationError, BackendError) as exc:
            raise AgentError(f"the firmware did not run with the new overlay: {exc}") from None
        if not np.array_equal(got, want):
            raise AgentError("the firmware with the new overlay differs from the reference "
                             "on the updated graph; the round is not kept")
        graph = dump_quantized(trained)
        digest = sha256_hex(graph)
        name = f"graph-{digest[:16]}.npz"
        info = self.store.state.slot(self.store.state.active or "")
        assert info is not None
        disk = self.store.disk
        disk.atomic_write(slot_dir / name, graph)
        record = OverlayRecord(round_id, info.sha256, overlay, sha256_hex(overlay), name, digest,
                               tuple(tuple(int(x) for x in row) for row in want[:len(vectors)]))
        disk.atomic_write(slot_dir / OVERLAY_FILE, record.to_json())
        for stale in slot_dir.glob("graph-*.npz"):
            if stale.name != name:
                disk.unlink(stale)

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the overlay in use (round, sha256) or none."""
        record = self.record()
        return {"overlay_round": None if record is None else record.round,
                "overlay_sha256": None if record is None else record.overlay_sha256,
                "graph_sha256": None if record is None else record.graph_sha256}

