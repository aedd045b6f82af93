"""The dependency rules of DESIGN.md, checked on the source (no imports executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IO_FRAMEWORKS = {"flask", "celery", "paho", "sqlalchemy", "redis", "alembic", "gunicorn", "click"}

pytestmark = pytest.mark.unit


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _sources(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    return files


@pytest.mark.parametrize("path", _sources("firmware"), ids=lambda p: str(p.relative_to(ROOT)))
def test_firmware_imports_no_io_framework_nor_other_packages(path: Path) -> None:
    bad = _imports(path) & (IO_FRAMEWORKS | {"service", "workers", "device_agent"})
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _sources("firmware"), ids=lambda p: str(p.relative_to(ROOT)))
def test_firmware_reads_no_environment(path: Path) -> None:
    text = path.read_text()
    assert "os.environ" not in text and "getenv" not in text, path.relative_to(ROOT)


def test_device_agent_imports_no_backend() -> None:
    for path in _sources("device_agent"):
        bad = _imports(path) & {"service", "workers", "flask", "celery", "sqlalchemy"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
