"""`tinyfleet tokens|mcus|devices|db`, run in-process on a temporary var/ (SQLite)."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from firmware.targets import CATALOG
from service.auth import hash_token
from service.cli import main
from service.db import head_revision

pytestmark = pytest.mark.unit


@pytest.fixture
def var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    var_dir = tmp_path / "var"
    for key in list(os.environ):
        if key.startswith("TINYFLEET_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TINYFLEET_VAR_DIR", str(var_dir))
    return var_dir


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def rows(var: Path, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(f"sqlite:///{var / 'tinyfleet.db'}")
    with engine.connect() as conn:
        out = [tuple(r) for r in conn.execute(text(sql))]
    engine.dispose()
    return out


def test_tokens_create_list_revoke(var: Path) -> None:
    created = run("tokens", "create", "--role", "admin", "--name", "me")
    assert created.exit_code == 0
    secret = created.stdout.strip()
    assert secret.startswith("tf_")
    assert rows(var, "SELECT token_hash, role FROM api_tokens") == [(hash_token(secret),
                                                                     "admin")]
    listing = run("tokens", "list", "--json")
    assert secret not in listing.stdout
    assert json.loads(listing.stdout)["items"][0]["role"] == "admin"
    assert run("tokens", "revoke", "1").exit_code == 0
    assert rows(var, "SELECT revoked_at IS NOT NULL FROM api_tokens") == [(1,)]
    assert run("tokens", "revoke", "7").exit_code == 1
    assert run("tokens", "create", "--role", "root").exit_code == 2


def test_mcus_table_and_json(var: Path) -> None:
    table = run("mcus").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "VENDOR", "CORE"]
    assert len(table) == 2 + len(CATALOG)
    assert any(line.split()[:3] == ["stm32f746", "ST", "cortex-m7"] for line in table)
    items = json.loads(run("mcus", "--json").stdout)["items"]
    assert {m["name"] for m in items} == set(CATALOG)


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_csv_writes_credentials_once(var: Path, tmp_path: Path) -> None:
    src = _write_csv(tmp_path / "fleet.csv", [
        "name,mcu,sram_bytes,flash_bytes,cpu,tags,ota_layout",
        "gh-1,stm32f746,,,,lab;roof,",
        "gh-2,,256KiB,1MiB,cortex-m4,lab,single",
        "gh-3,nrf52840,,,,,",
    ])
    assert run("devices", "import", str(src), "--fleet", "gh").exit_code == 1  # no fleet yet
    assert not (var / "credentials").exists()
    result = run("devices", "import", str(src), "--fleet", "gh", "--create-fleet", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["count"] == 3 and summary["created_fleets"] == ["gh"]
    cred = Path(summary["credentials_file"])
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    with cred.open() as f:
        creds = list(csv.DictReader(f))
    assert [c["name"] for c in creds] == ["gh-1", "gh-2", "gh-3"]
    assert all(c["mqtt_username"] == c["device_id"] and len(c["mqtt_password"]) >= 20
               for c in creds)
    shown = json.loads(run("devices", "show", "gh-2", "--json").stdout)
    assert (shown["mcu"], shown["sram_bytes"], shown["ota_layout"]) == ("custom", 262144,
                                                                        "single")
    listed = json.loads(run("devices", "list", "--tag", "lab", "--json").stdout)["items"]
    assert {d["name"] for d in listed} == {"gh-1", "gh-2"}
    assert "gh-3" in run("devices", "list", "--fleet", "gh").stdout
    assert run("devices", "decommission", "gh-3").exit_code == 0
    assert rows(var, "SELECT state FROM devices WHERE name = 'gh-3'") == [("decommissioned",)]


def test_bad_csv_names_lines_and_writes_nothing(var: Path, tmp_path: Path) -> None:
    src = _write_csv(tmp_path / "bad.csv", [
        "name,fleet,mcu,sram_bytes,flash_bytes,cpu",
        "ok-1,gh,stm32f412,,,",
        "bad-1,gh,stm32f999,,,",
        "bad-2,gh,,lots,1MiB,cortex-m4",
        "ok-1,gh,rp2040,,,",
    ])
    result = run("devices", "import", str(src), "--create-fleet", "--json")
    assert result.exit_code == 1
    errors = json.loads(result.stdout)["errors"]
    assert {(e["line"], e["field"]) for e in errors} == {(3, "mcu"), (4, "sram_bytes"),
                                                         (5, "name")}
    assert rows(var, "SELECT count(*) FROM devices") == [(0,)]
    assert rows(var, "SELECT count(*) FROM fleets") == [(0,)]
    assert not (var / "credentials").exists()
    header = _write_csv(tmp_path / "header.csv", ["name,colour", "x,red"])
    result = run("devices", "import", str(header), "--fleet", "gh")
    assert result.exit_code == 1 and "colour" in result.stderr


def test_db_upgrade(var: Path) -> None:
    result = run("db", "upgrade")
    assert result.exit_code == 0 and head_revision() in result.stdout
    assert run("db", "current").stdout.strip() == head_revision()


def _credentials(path: Path) -> dict[str, str]:
    with path.open() as f:
        return {row["name"]: row["mqtt_password"] for row in csv.DictReader(f)}


def test_rotate_credentials(var: Path, tmp_path: Path) -> None:
    from service.mqtt_passwords import verify_password

    src = _write_csv(tmp_path / "fleet.csv", ["name,mcu,tags", "r-1,rp2040,a", "r-2,rp2040,b",
                                              "r-3,STM32F746,a"])
    imported = json.loads(run("devices", "import", str(src), "--fleet", "gh", "--create-fleet",
                              "--json").stdout)
    first = _credentials(Path(imported["credentials_file"]))
    result = run("devices", "rotate-credentials", "--tag", "a", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["count"] == 2
    cred = Path(summary["credentials_file"])
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    rotated = _credentials(cred)
    assert set(rotated) == {"r-1", "r-3"}
    hashes = dict(rows(var, "SELECT name, mqtt_password_hash FROM devices"))
    for name in ("r-1", "r-3"):
        assert verify_password(rotated[name], str(hashes[name]))
        assert not verify_password(first[name], str(hashes[name]))
    assert verify_password(first["r-2"], str(hashes["r-2"]))
    assert run("devices", "rotate-credentials", "r-2").exit_code == 0
    assert run("devices", "rotate-credentials").exit_code == 1  # nothing selected
    assert run("devices", "decommission", "r-2").exit_code == 0
    refused = run("devices", "rotate-credentials", "r-2", "--json")
    assert refused.exit_code == 1 and "decommissioned" in refused.stdout


def test_token_expiry_option(var: Path) -> None:
    created = run("tokens", "create", "--role", "viewer", "--expires-in", "2h", "--json")
    assert created.exit_code == 0, created.output
    token = json.loads(created.stdout)["token"]
    from datetime import datetime

    lifetime = (datetime.fromisoformat(token["expires_at"])
                - datetime.fromisoformat(token["created_at"]))
    assert lifetime.total_seconds() == 7200
    assert "EXPIRES" in run("tokens", "list").stdout.splitlines()[0]
    assert run("tokens", "create", "--role", "viewer", "--expires-in", "5").exit_code == 2
    assert run("tokens", "create", "--role", "viewer", "--expires-in", "soon").exit_code == 2
