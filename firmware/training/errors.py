"""The exceptions of `firmware.training`: one root under FirmwareError."""

from __future__ import annotations

from firmware.errors import FirmwareError


class TrainingError(FirmwareError):
    """Root of the training errors: a graph or data set the engine cannot train."""


class SchemeError(TrainingError):
    """A sparse-update scheme is malformed or does not fit the graph it is applied to."""


class ModelVersionError(TrainingError):
    """A fine-tuned model version is malformed, or its base is missing or changed."""
