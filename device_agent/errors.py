"""The device agent's exceptions: one root, a refusal that carries its reason."""

from __future__ import annotations


class AgentError(Exception):
    """Anything the device agent cannot do, with a message naming the thing and the limit."""


class InstallRefused(AgentError):
    """An image the device will not install: bad signature or hash, another MCU, too big."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SlotError(AgentError):
    """The slot directory is unusable (no good slot, unreadable state)."""


class BackendError(AgentError):
    """An inference backend cannot run here (no emulator for the core, a bad library)."""
