"""agent.toml: who the device is, where its broker, data and slots are, the fleet's key.

    [device]
    id = "dev-0001"
    password = "..."            # shown once by the registry; `tinyfleet devices agent-config`
    mcu = "stm32f746"           # catalog name (its core and memory)
    backend = "host"            # host | qemu
    cpu = "cortex-m7"           # the device's core and memory (from the registry); needed
    sram_bytes = 327680         # when mcu is not a catalog name ("custom")
    flash_bytes = 1048576
    slot_bytes = 507904

    [broker]
    host = "127.0.0.1"
    port = 1883

    [paths]
    data_dir = "/var/lib/tinyfleet-agent/data"
    slot_dir = "/var/lib/tinyfleet-agent/slots"

    [fleet]
    public_key = \"\"\"-----BEGIN PUBLIC KEY----- ...\"\"\"   # the fleet's Ed25519 signing key

    [personalize]
    every_s = 0                 # rounds on a schedule (0: only on command)

Relative paths are taken from the file's directory.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import AgentError
from device_agent.profile import BackendKind, DeviceProfile
from firmware.errors import FirmwareError


@dataclass(frozen=True)
class AgentConfig:
    """A parsed agent.toml."""

    device_id: str
    password: str
    mcu: str
    backend: BackendKind
    broker_host: str
    broker_port: int
    data_dir: Path
    slot_dir: Path
    public_key_pem: bytes
    personalize_every_s: float = 0.0
    cpu: str | None = None
    sram_bytes: int | None = None
    flash_bytes: int | None = None
    slot_bytes: int | None = None

    def profile(self) -> DeviceProfile:
        """The device: its registry figures when given, else the MCU catalog's."""
        if None not in (self.cpu, self.sram_bytes, self.flash_bytes, self.slot_bytes):
            assert self.cpu is not None and self.sram_bytes is not None
            assert self.flash_bytes is not None and self.slot_bytes is not None
            return DeviceProfile(self.device_id, self.mcu, self.cpu, self.sram_bytes,
                                 self.flash_bytes, self.slot_bytes, self.backend)
        try:
            return DeviceProfile.for_mcu(self.device_id, self.mcu, self.backend)
        except FirmwareError as exc:
            raise AgentError(f"agent config: {exc}; give [device] cpu, sram_bytes, "
                             "flash_bytes and slot_bytes") from None

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        """Read and check agent.toml; AgentError names the bad field."""
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AgentError(f"{path}: {exc}") from None
        return cls.from_dict(doc, path.parent)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], base: Path) -> AgentConfig:
        """From the TOML document's tables."""

        def field(table: str, key: str, kind: type | tuple[type, ...],
                  default: Any = None) -> Any:
            value = doc.get(table, {}).get(key, default)
            if value is None:
                raise AgentError(f"agent config: [{table}] {key} is missing")
            if not isinstance(value, kind) or isinstance(value, bool):
                names = kind if isinstance(kind, tuple) else (kind,)
                raise AgentError(f"agent config: [{table}] {key} must be "
                                 f"{' or '.join(k.__name__ for k in names)}")
            return value

        try:
            backend = BackendKind(field("device", "backend", str, "host"))
        except ValueError:
            raise AgentError("agent config: [device] backend must be host or qemu") from None
        port = field("broker", "port", int, 1883)
        if not 0 < port < 65536:
            raise AgentError(f"agent config: [broker] port {port} is not a TCP port")
        every = field("personalize", "every_s", (int, float), 0)
        if every < 0:
            raise AgentError("agent config: [personalize] every_s must be >= 0")
        return cls(
            device_id=field("device", "id", str), password=field("device", "password", str),
            mcu=field("device", "mcu", str), backend=backend,
            broker_host=field("broker", "host", str, "127.0.0.1"), broker_port=port,
            data_dir=base / field("paths", "data_dir", str),
            slot_dir=base / field("paths", "slot_dir", str),
            public_key_pem=field("fleet", "public_key", str).encode(),
            personalize_every_s=float(every),
            cpu=doc.get("device", {}).get("cpu"),
            sram_bytes=doc.get("device", {}).get("sram_bytes"),
            flash_bytes=doc.get("device", {}).get("flash_bytes"),
            slot_bytes=doc.get("device", {}).get("slot_bytes"))


def render_config(*, device_id: str, password: str, mcu: str, backend: str,
                  broker_host: str, broker_port: int, data_dir: str, slot_dir: str,
                  public_key_pem: str, cpu: str | None = None, sram_bytes: int | None = None,
                  flash_bytes: int | None = None, slot_bytes: int | None = None) -> str:
    """The text of an agent.toml (what `tinyfleet devices agent-config` writes)."""
    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join([
        "# tinyfleet-agent configuration (contains the device's password: keep it 0600)",
        "[device]", f"id = {q(device_id)}", f"password = {q(password)}", f"mcu = {q(mcu)}",
        f"backend = {q(backend)}",
        *([] if cpu is None else [f"cpu = {q(cpu)}", f"sram_bytes = {sram_bytes}",
                                  f"flash_bytes = {flash_bytes}", f"slot_bytes = {slot_bytes}"]),
        "", "[broker]", f"host = {q(broker_host)}",
        f"port = {broker_port}", "", "[paths]", f"data_dir = {q(data_dir)}",
        f"slot_dir = {q(slot_dir)}", "", "[fleet]",
        f'public_key = """\n{public_key_pem.strip()}\n"""', "", "[personalize]",
        "every_s = 0", ""])
