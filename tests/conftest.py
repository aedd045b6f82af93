"""Session-wide fixtures: real Redis, Mosquitto and Celery worker processes (tests/servers.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import (
    CeleryWorker,
    MosquittoServer,
    RedisServer,
    start_celery_worker,
    start_mosquitto,
    start_redis,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of our own on a free port, for the whole session."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], MosquittoServer]]:
    """Starts Mosquitto brokers (each with its own broker dir); all stop at session end."""
    started: list[MosquittoServer] = []
    roots: list[Path] = []

    def make() -> MosquittoServer:
        # Not under pytest's 0700 basetemp: Mosquitto started as root drops to user
        # `mosquitto`, which must reach its directory, exactly as under the stack's var/.
        root = Path(tempfile.mkdtemp(prefix="tinyfleet-mqtt-"))
        root.chmod(0o755)
        roots.append(root)
        server = start_mosquitto(root)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mosquitto_server(mosquitto_factory: Callable[[], MosquittoServer]) -> MosquittoServer:
    """A Mosquitto broker for one test module, with the stack's generated config."""
    return mosquitto_factory()


@pytest.fixture(scope="session")
def celery_worker(tmp_path_factory: pytest.TempPathFactory,
                  redis_server: RedisServer) -> Iterator[CeleryWorker]:
    """A `celery -A workers.celery_app worker` process on `redis_server`, for the session."""
    worker = start_celery_worker(tmp_path_factory.mktemp("worker"), redis_server)
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def digits_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A family trained by the CLI on 400 digits for 1 epoch at 16 and 24 px (no contribution
    analysis: the tests that need one run `tinyfleet contributions` small)."""
    import json

    import numpy as np
    from click.testing import CliRunner

    from service.cli import main
    from tests.firmware.tiny_family import small_digits

    root = tmp_path_factory.mktemp("family")
    data = small_digits()
    images = np.concatenate([data.train.images, data.val.images, data.test.images])
    labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    np.savez(root / "digits.npz", x=images, y=labels)
    out = root / "fam"
    result = CliRunner().invoke(main, [
        "train-supernet", "--data", str(root / "digits.npz"), "--epochs", "1",
        "--batch-size", "64", "--resolutions", "16,24", "--predictor-samples", "8",
        "--no-contributions", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["space"]["resolutions"] == [16, 24]
    assert manifest["classes"] == [str(i) for i in range(10)]
    assert (out / "supernet.pt").is_file() and (out / "checkpoint.pt").is_file()
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a real server are integration tests, whatever their module says."""
    servers = {"redis_server", "mosquitto_server", "mosquitto_factory", "celery_worker"}
    for item in items:
        if servers & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)

