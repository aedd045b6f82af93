"""Signed images for the device agent tests: the checked-in digits net, built once.

`build_images(work)` compiles the TinyNet of tests/firmware/training/fixture_model for an
STM32F746 with a sparse-update scheme (so with a weights overlay region and its int8 graph
in the manifest) and builds its host library image; `resign` makes other versions of an
image (same payload, another model version) and foreign or oversized ones for the refusals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.image import ImageTarget, generate_signing_key, parse_image, sign_image
from firmware.pipeline import CompileOptions, Dataset, compile_model, host_image
from firmware.targets import get_target
from firmware.training.scheme import SparseUpdateScheme, WeightUpdate
from tests.firmware.training.fixture_model import inputs, plain_digits, quantized

MCU = "stm32f746"
SCHEME = SparseUpdateScheme(bias_layers=3, weights=(WeightUpdate("head", 0.5),), lr=0.005)


@dataclass(frozen=True)
class Images:
    """The key and the images every agent test uses."""

    key: Ed25519PrivateKey
    mcu: bytes  # firmware ELF for stm32f746 (qemu backend)
    host: bytes  # the same model as a host-x86_64 library (host backend)


def build_images(work: Path) -> Images:
    """Compile the digits net for stm32f746 with SCHEME, and its host image (~4 s)."""
    key = generate_signing_key()
    q = quantized()
    test = Dataset(inputs(plain_digits().test.images[:4]))
    result = compile_model(q.graph, get_target(MCU), key, work / "mcu", test=test,
                           options=CompileOptions(sparse_update=SCHEME.to_dict(),
                                                  onnx_check=False, model_id="digits",
                                                  model_version="1"), quantized=q)
    return Images(key=key, mcu=result.image, host=host_image(result, key, work / "host"))


def resign(image: bytes, key: Ed25519PrivateKey, **changes: object) -> bytes:
    """The image with manifest fields changed (e.g. model_version="2"), signed by `key`."""
    parsed = parse_image(image)
    target = changes.pop("target", None)
    manifest = dataclasses.replace(parsed.manifest, **changes)  # type: ignore[arg-type]
    if isinstance(target, dict):
        manifest = dataclasses.replace(manifest, target=ImageTarget(**{
            **dataclasses.asdict(manifest.target), **target}))
    return sign_image(manifest, parsed.payload, key)
