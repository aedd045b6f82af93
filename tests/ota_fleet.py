"""A registry with devices on a real Mosquitto, and signed images, for the OTA tests and bench.

Devices are registered through the REST API (bulk), so their MQTT credentials and ACL are
the registry's own (service.broker_sync); the fleet's signing key is the one the registry
made for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from device_agent.reference_client import DeviceIdentity
from firmware.image import (
    ImageSchedule,
    ImageTarget,
    MemoryFigures,
    PayloadFormat,
    TensorQuant,
    TestVector,
    make_manifest,
    sign_image,
)
from service.app import create_app
from service.auth import create_token
from service.broker_sync import full_sync
from service.fleets import load_signing_key
from service.models import (
    AnalysisState,
    Campaign,
    CampaignState,
    DeploymentJob,
    Fleet,
    JobState,
    ModelKind,
    ModelVersion,
    Role,
)
from tests.servers import MosquittoServer

# (catalog MCU, cpu, SRAM, Flash) of the classes the tests and the bench use.
MCUS: dict[str, tuple[str, int, int]] = {
    "stm32f746": ("cortex-m7", 320 * 1024, 1024 * 1024),
    "stm32f412": ("cortex-m4", 256 * 1024, 1024 * 1024),
    "stm32h743": ("cortex-m7", 1024 * 1024, 2048 * 1024),
    "nrf52840": ("cortex-m4", 256 * 1024, 1024 * 1024),
    "rp2040": ("cortex-m0+", 264 * 1024, 2048 * 1024),
}


def signed_image(key: Ed25519PrivateKey, mcu: str, payload_bytes: int, seed: int = 0) -> bytes:
    """A signed image for `mcu` whose payload is `payload_bytes` of deterministic bytes."""
    cpu, sram, flash = MCUS[mcu]
    block = hashlib.sha256(f"{mcu}-{seed}".encode()).digest()
    payload = (b"\x7fELF" + block * (payload_bytes // len(block) + 1))[:payload_bytes]
    manifest = make_manifest(
        model_id="kws-tiny", model_version=f"v{seed}",
        target=ImageTarget(mcu, cpu, sram, flash, flash // 2),
        schedule=ImageSchedule(1, None, None, "inplace"),
        predicted=MemoryFigures(100_000, payload_bytes), measured=None,
        input=TensorQuant(0.0078, 0, (1, 4, 4)), output=TensorQuant(0.09, 14, (10, 1, 1)),
        test_vectors=(TestVector(bytes(16), (0,) * 10),),
        payload=payload, payload_format=PayloadFormat.BIN)
    return sign_image(manifest, payload, key)


@dataclass
class OtaFleet:
    """A service registry (SQLite under `var`) whose broker is `broker`, with fleet `lab`."""

    broker: MosquittoServer
    var: Path
    app: Flask = field(init=False)
    api: FlaskClient = field(init=False)

    def __post_init__(self) -> None:
        files = self.broker.files
        self.app = create_app({
            "VAR_DIR": str(self.var), "DATABASE_URL": f"sqlite:///{self.var / 'registry.db'}",
            "BROKER_DIR": str(files.broker_dir), "MOSQUITTO_PID_FILE": str(files.pid_file),
            "MQTT_HOST": self.broker.host, "MQTT_PORT": self.broker.port,
        })
        full_sync(self.engine, self.broker.target)
        with self.app.app_context():
            session = self.app.extensions["tinyfleet.sessionmaker"]()
            _, secret = create_token(session, Role.ADMIN, name="ota-tests")
            session.commit()
            session.close()
        self.api = self.app.test_client()
        self.api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
        response = self.api.post("/api/v1/fleets", json={"name": "lab"})
        assert response.status_code == 201, response.get_json()

    @property
    def engine(self) -> Engine:
        """The registry's database engine."""
        engine: Engine = self.app.extensions["tinyfleet.engine"]
        return engine

    @property
    def config(self) -> dict[str, Any]:
        """The service settings (what the bridge reads from TINYFLEET_*)."""
        return dict(self.app.config)

    def register(self, n: int, mcu: str, prefix: str) -> list[DeviceIdentity]:
        """Register `n` devices of one MCU through the bulk API; their identities."""
        rows = [{"name": f"{prefix}-{i}", "fleet": "lab", "mcu": mcu} for i in range(n)]
        out: list[DeviceIdentity] = []
        for start in range(0, n, 10_000):
            response = self.api.post("/api/v1/devices/bulk",
                                     json={"devices": rows[start:start + 10_000]})
            assert response.status_code == 201, response.get_json()
            body = response.get_json()
            for device in body["devices"]:
                out.append(DeviceIdentity(device["id"], device["mqtt_password"], mcu))
        return out

    def campaign_jobs(self, model_id: str, devices: list[str], state: JobState,
                      **job_fields: Any) -> tuple[int, list[int]]:
        """A running one-batch campaign of a (stub) ONNX model version over `devices`, each
        device's job in `state`, written straight to the registry: (campaign id, job ids)."""
        with self.app.extensions["tinyfleet.sessionmaker"]() as s:
            fleet_id = s.scalars(select(Fleet.id).where(Fleet.name == "lab")).one()
            s.add(ModelVersion(id=model_id, name="m", kind=ModelKind.ONNX, path="/x",
                               size_bytes=1, analysis_state=AnalysisState.NONE))
            s.flush()  # before the campaign that names it
            campaign = Campaign(model_version_id=model_id, state=CampaignState.RUNNING,
                                selector="{}", canary_percent=0, batch_size=10,
                                max_failure_percent=100, personalize=False,
                                offer_deadline_s=60, install_deadline_s=600, batch_count=1,
                                current_batch=0)
            s.add(campaign)
            s.flush()
            jobs = [DeploymentJob(campaign_id=campaign.id, device_id=d, fleet_id=fleet_id,
                                  batch=0, hw_class="c", hw="{}", state=state, **job_fields)
                    for d in devices]
            s.add_all(jobs)
            s.commit()
            return campaign.id, [job.id for job in jobs]

    def signing_key(self) -> Ed25519PrivateKey:
        """The fleet's private signing key, as the firmware signer loads it."""
        with self.app.app_context():
            session = self.app.extensions["tinyfleet.sessionmaker"]()
            fleet = session.scalars(select(Fleet).where(Fleet.name == "lab")).one()
            key = load_signing_key(fleet)
            session.close()
        return key
