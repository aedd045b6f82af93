"""`tinyfleet devices agent-config NAME`: an agent.toml (0600) with a freshly rotated password."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from device_agent.config import AgentConfig
from device_agent.profile import BackendKind
from firmware.image import load_public_key
from service.mqtt_passwords import verify_password
from tests.service.test_cli_registry import rows, run, var  # noqa: F401 - the fixture

pytestmark = pytest.mark.unit


def test_agent_config_rotates_and_writes_a_private_file(var: Path, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "fleet.csv"
    src.write_text("name,mcu\nsensor-1,stm32f746\nsensor-2,rp2040\n")
    imported = json.loads(run("devices", "import", str(src), "--fleet", "lab",
                              "--create-fleet", "--json").stdout)
    first = dict(line.split(",")[1::5] for line in
                 Path(imported["credentials_file"]).read_text().splitlines()[1:])
    out = tmp_path / "agent" / "agent.toml"
    out.parent.mkdir()
    result = run("devices", "agent-config", "sensor-1", "-o", str(out), "--backend", "qemu",
                 "--json")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    config = AgentConfig.load(out)
    (device_id, pw_hash), = rows(var, "SELECT id, mqtt_password_hash FROM devices "
                                      "WHERE name = 'sensor-1'")
    assert config.device_id == device_id and config.backend is BackendKind.QEMU
    assert verify_password(config.password, str(pw_hash))
    assert not verify_password(first["sensor-1"], str(pw_hash))  # the old one is gone
    assert config.data_dir == out.parent / "data" and config.slot_dir == out.parent / "slots"
    profile = config.profile()
    assert (profile.mcu, profile.cpu, profile.sram_bytes) == ("stm32f746", "cortex-m7",
                                                              320 * 1024)
    load_public_key(config.public_key_pem)
    assert run("devices", "agent-config", "sensor-1", "-o", str(out)).exit_code == 1  # exists
    assert run("devices", "agent-config", "nobody", "-o", str(tmp_path / "x.toml"),
               "--json").exit_code == 1
