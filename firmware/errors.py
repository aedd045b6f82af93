"""The exception tree of `firmware`: one root, one subclass per kind of failure."""

from __future__ import annotations


class FirmwareError(Exception):
    """Root of every error raised by the firmware package."""


class UnsupportedOpError(FirmwareError):
    """A model uses an operator (or an attribute of one) the compiler does not support."""


class InvalidModelError(FirmwareError):
    """A model is malformed: shapes disagree, a tensor has no producer, and the like."""


class DoesNotFitError(FirmwareError):
    """No schedule or network fits the memory budget; the message names the numbers."""


class BuildError(FirmwareError):
    """Compiling or linking generated firmware failed; the message carries the tool's words."""


class NoToolchainError(BuildError):
    """No compiler for the target's core is installed: nothing was built or emulated."""


class EmulationError(FirmwareError):
    """Running firmware in QEMU failed, timed out, or returned a wrong exit code."""


class ImageError(FirmwareError):
    """A firmware image is malformed, tampered with, or its signature does not verify."""
