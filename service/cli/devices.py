"""`tinyfleet devices import|list|show|rotate-credentials|decommission`, on the database.

CSV columns for `import` (a header row is required; empty cells mean "not given"):
  name         device name, unique (required)
  fleet        fleet name (or --fleet for every row)
  mcu          catalog MCU name (`tinyfleet mcus`), or else all three of:
  sram_bytes   e.g. 262144 or 256KiB
  flash_bytes  e.g. 1048576 or 1MiB
  cpu          cortex-m0plus | cortex-m3 | cortex-m4 | cortex-m7 | cortex-m33 | xtensa-lx7
  tags         separated by spaces or ';'
  ota_layout   ab (default) | single
"""

from __future__ import annotations

import csv
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from service.api.common import device_json
from service.cli.context import app_session, echo_json, fail, registry_context
from service.cli.ui import print_table, progress_bar
from service.device_list import list_devices
from service.models import DeviceState
from service.parsing import validate
from service.problems import ApiError, FieldError
from service.registry import (
    Registered,
    decommission,
    find_device,
    parse_rows,
    register_devices,
    rotate_credentials,
    select_for_rotation,
)
from service.schemas import MAX_BULK_DEVICES, CredentialRotation, DeviceCreate, DeviceQuery

CSV_COLUMNS = ("name", "fleet", "mcu", "sram_bytes", "flash_bytes", "cpu", "tags",
               "ota_layout")


@click.group()
def devices() -> None:
    """Register (from CSV), list, show, rotate credentials of and decommission devices."""


def read_csv(path: Path, fleet: str | None) -> list[DeviceCreate]:
    """The rows of a device CSV as DeviceCreate, or ApiError 422 naming each row and field."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        unknown = [c for c in header if c not in CSV_COLUMNS]
        if "name" not in header or unknown:
            why = (f"unknown column(s) {', '.join(unknown)}" if unknown
                   else "no 'name' column")
            raise ApiError(422, f"{path}: {why}; columns: {', '.join(CSV_COLUMNS)}",
                           [FieldError("header", why)])
        raw_rows = list(reader)
    if len(raw_rows) > MAX_BULK_DEVICES:
        message = f"{len(raw_rows)} rows; the limit is {MAX_BULK_DEVICES} per import"
        raise ApiError(413, message, [FieldError("rows", message)])
    data_rows: list[dict[str, Any]] = []
    for raw in raw_rows:
        data = {k: v.strip() for k, v in raw.items()
                if k is not None and isinstance(v, str) and v.strip()}
        if fleet is not None:
            data.setdefault("fleet", fleet)
        row: dict[str, Any] = dict(data)
        if "tags" in data:
            row["tags"] = data["tags"].replace(";", " ").split()
        if "mcu" in data:  # catalog names are lower case; a spreadsheet may not be
            row["mcu"] = data["mcu"].lower()
        data_rows.append(row)
    return parse_rows(data_rows)


def write_credentials(cred_dir: Path, label: str, devices: list[Registered], host: str,
                      port: int) -> Path:
    """New MQTT credentials as CSV, mode 0600 (they are shown only once)."""
    cred_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = cred_dir / f"{label}-{stamp}.csv"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["device_id", "name", "fleet", "mqtt_host", "mqtt_port",
                         "mqtt_username", "mqtt_password"])
        for r in devices:
            if r.mqtt_password is not None:
                writer.writerow([r.device_id, r.name, r.fleet, host, port, r.device_id,
                                 r.mqtt_password])
    return path


@devices.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--fleet", default=None, help="fleet of rows without a fleet column/value")
@click.option("--create-fleet", is_flag=True, help="create fleets that do not exist yet")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def import_cmd(csv_file: Path, fleet: str | None, create_fleet: bool, as_json: bool) -> None:
    """Register every device of CSV_FILE, or none; credentials go to a 0600 file."""
    with app_session() as (app, session):
        try:
            rows = read_csv(csv_file, fleet)
            if not rows:
                raise ApiError(422, f"{csv_file} has no rows", [FieldError("rows", "none")])
            with progress_bar(f"hashing {len(rows)} passwords", len(rows)) as update:
                result = register_devices(session, rows, registry_context(app),
                                          create_fleets=create_fleet, progress=update)
        except ApiError as err:
            fail(err, as_json, first_line=2)
        host, port = str(app.config["MQTT_HOST"]), int(app.config["MQTT_PORT"])
        label = fleet or (rows[0].fleet if len({r.fleet for r in rows}) == 1 else "import")
        path = write_credentials(Path(app.config["VAR_DIR"]) / "credentials", label,
                                 result.devices, host, port)
    summary = {"count": len(result.devices), "created_fleets": result.created_fleets,
               "credentials_file": str(path.resolve()), "mqtt_host": host, "mqtt_port": port}
    if as_json:
        echo_json(summary)
        return
    click.echo(f"registered {len(result.devices)} devices"
               + (f"; created fleets {', '.join(result.created_fleets)}"
                  if result.created_fleets else ""))
    click.echo(f"MQTT credentials (shown only here, mode 0600): {summary['credentials_file']}")


@devices.command("list")
@click.option("--fleet", default=None, help="only this fleet")
@click.option("--tag", "tags", multiple=True, help="only devices with this tag (repeatable)")
@click.option("--mcu", default=None, help="only this catalog MCU (or 'custom')")
@click.option("--state", type=click.Choice([s.value for s in DeviceState]), default=None)
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--cursor", default=None, help="next_cursor of the previous page")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def list_cmd(fleet: str | None, tags: tuple[str, ...], mcu: str | None, state: str | None,
             limit: int, cursor: str | None, as_json: bool) -> None:
    """List devices, filtered, one page at a time."""
    args: dict[str, Any] = {"fleet": fleet, "tag": list(tags), "mcu": mcu, "state": state,
                            "limit": limit, "cursor": cursor}
    with app_session() as (_app, session):
        try:
            query = validate(DeviceQuery, {k: v for k, v in args.items() if v is not None})
            items, next_cursor = list_devices(session, query)
        except ApiError as err:
            fail(err, as_json)
        data = [device_json(d) for d in items]
    if as_json:
        echo_json({"items": data, "next_cursor": next_cursor})
        return
    print_table(["ID", "NAME", "FLEET", "MCU", "SRAM", "FLASH", "SLOT", "STATE", "TAGS"],
                [[d["id"], d["name"], d["fleet"], d["mcu"], str(d["sram_bytes"]),
                  str(d["flash_bytes"]), str(d["slot_bytes"]), d["state"],
                  " ".join(d["tags"])] for d in data], right={4, 5, 6})
    if next_cursor:
        click.echo(f"more: --cursor {next_cursor}")


@devices.command("show")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def show(key: str, as_json: bool) -> None:
    """Show the device with id or name KEY."""
    with app_session() as (_app, session):
        try:
            data = device_json(find_device(session, key))
        except ApiError as err:
            fail(err, as_json)
    if as_json:
        echo_json(data)
        return
    for k, v in data.items():
        click.echo(f"{k:13} {' '.join(v) if isinstance(v, list) else v}")


@devices.command("decommission")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def decommission_cmd(key: str, as_json: bool) -> None:
    """Decommission device KEY: its MQTT login stops working after the broker reloads."""
    with app_session() as (app, session):
        try:
            data = device_json(decommission(session, key, registry_context(app)))
        except ApiError as err:
            fail(err, as_json)
    if as_json:
        echo_json(data)
    else:
        click.echo(f"decommissioned {data['id']} ({data['name']})")


@devices.command("rotate-credentials")
@click.argument("keys", nargs=-1)
@click.option("--fleet", default=None, help="every active device of this fleet")
@click.option("--tag", "tags", multiple=True, help="active devices with this tag (repeatable)")
@click.option("--mcu", default=None, help="active devices of this catalog MCU (or 'custom')")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def rotate_cmd(keys: tuple[str, ...], fleet: str | None, tags: tuple[str, ...],
               mcu: str | None, as_json: bool) -> None:
    """New MQTT passwords for devices KEYS (ids or names), or for those the filters select;
    the old passwords stop working at once. The new ones go to a 0600 file."""
    spec_data: dict[str, Any] = {"fleet": fleet, "tag": list(tags) or None, "mcu": mcu,
                                 "devices": list(keys) or None}
    with app_session() as (app, session):
        try:
            spec = validate(CredentialRotation,
                            {k: v for k, v in spec_data.items() if v is not None})
            selected = select_for_rotation(session, spec)
            with progress_bar(f"hashing {len(selected)} passwords", len(selected)) as update:
                done = rotate_credentials(session, selected, registry_context(app),
                                          progress=update)
        except ApiError as err:
            fail(err, as_json)
        host, port = str(app.config["MQTT_HOST"]), int(app.config["MQTT_PORT"])
        label = f"{fleet or 'devices'}-rotated"
        path = write_credentials(Path(app.config["VAR_DIR"]) / "credentials", label, done,
                                 host, port)
    summary = {"count": len(done), "credentials_file": str(path.resolve()),
               "devices": [d.device_id for d in done], "mqtt_host": host, "mqtt_port": port}
    if as_json:
        echo_json(summary)
        return
    click.echo(f"rotated the MQTT credentials of {len(done)} device(s); the old passwords "
               "no longer work")
    click.echo(f"new credentials (shown only here, mode 0600): {summary['credentials_file']}")


@devices.command("agent-config")
@click.argument("key")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("agent.toml"), show_default=True, help="file to write (0600)")
@click.option("--backend", type=click.Choice(["host", "qemu"]), default="host",
              show_default=True, help="how the agent runs the firmware")
@click.option("--data-dir", default="data", show_default=True,
              help="the device's local data (relative to the file)")
@click.option("--slot-dir", default="slots", show_default=True,
              help="the A/B slots (relative to the file)")
@click.option("--force", is_flag=True, help="overwrite an existing file")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def agent_config_cmd(key: str, output: Path, backend: str, data_dir: str, slot_dir: str,
                     force: bool, as_json: bool) -> None:
    """Write the tinyfleet-agent config of device KEY (id or name), mode 0600.

    Its MQTT password is rotated for it (the registry keeps only hashes, so the old one
    cannot be shown): the old password stops working, the new one is only in this file.
    """
    from device_agent.config import render_config

    if output.exists() and not force:
        raise click.ClickException(f"{output} exists; pass --force to replace it")
    with app_session() as (app, session):
        try:
            device = find_device(session, key)
            spec = validate(CredentialRotation, {"devices": [device.id]})
            done = rotate_credentials(session, select_for_rotation(session, spec),
                                      registry_context(app))
        except ApiError as err:
            fail(err, as_json)
        password = done[0].mqtt_password
        if password is None:
            raise click.ClickException(f"device {key} is decommissioned: no credentials")
        text = render_config(
            device_id=device.id, password=password, mcu=device.mcu, backend=backend,
            broker_host=str(app.config["MQTT_HOST"]), broker_port=int(app.config["MQTT_PORT"]),
            data_dir=data_dir, slot_dir=slot_dir,
            public_key_pem=device.fleet.signing_public_key, cpu=device.cpu,
            sram_bytes=device.sram_bytes, flash_bytes=device.flash_bytes,
            slot_bytes=device.slot_bytes)
    tmp = output.with_name(output.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, output)
    summary = {"device": device.id, "config": str(output.resolve()), "backend": backend}
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"wrote {output} for {device.id} (mode 0600; its MQTT password was "
                   "rotated, the old one no longer works)")
