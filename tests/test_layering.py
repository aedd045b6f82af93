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


def test_the_wire_protocol_is_pure() -> None:
    """device_agent/protocol.py is shared by both sides: encode/decode only, no I/O."""
    path = ROOT / "device_agent" / "protocol.py"
    bad = _imports(path) & (IO_FRAMEWORKS | {"paho", "socket", "service", "workers"})
    assert not bad, f"device_agent/protocol.py imports {sorted(bad)}"


def test_workers_use_only_the_protocol_of_device_agent() -> None:
    for path in _sources("workers"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name == "device_agent":
                    assert isinstance(node, ast.ImportFrom)
                    imported = {a.name for a in node.names}
                    assert imported == {"protocol"}, f"{path.relative_to(ROOT)}: {imported}"
                elif name.startswith("device_agent."):
                    assert name == "device_agent.protocol", f"{path.relative_to(ROOT)}: {name}"


# firmware/ as its pipeline: each part may import the ground floor, the parts listed for it,
# and itself. `pipeline` (ground floor, top of the order) runs every stage.
GROUND = {"ir", "errors", "arch", "targets", "data", "float_exec", "image"}
LOWER = {"frontend", "plan", "int8"}
MAY_IMPORT: dict[str, set[str]] = {
    **{module: set() for module in GROUND},
    **{part: set() for part in LOWER},
    "nas": LOWER,
    "codegen": LOWER,
    "toolchain": LOWER,
    "training": {"plan", "int8"},
    "pipeline": LOWER | {"nas", "codegen", "toolchain", "training"},
    # Joins model families (nas) and on-device training, beside pipeline at the top.
    "personalize": LOWER | {"nas", "training"},
    # A campaign's per-class plan (search) and build (pipeline): the top of the pipeline.
    "deploy": LOWER | {"nas", "training", "toolchain", "pipeline", "personalize"},
}


def _part(dotted: str) -> str:
    """`firmware.plan.memory` -> `plan`; `firmware.ir` -> `ir`."""
    return dotted.split(".")[1]


def _firmware_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    parts: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.relative_to(ROOT)}: use absolute firmware.* imports")
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "firmware":
                parts.update(alias.name for alias in node.names)
            elif node.module.startswith("firmware."):
                parts.add(_part(node.module))
        elif isinstance(node, ast.Import):
            parts.update(_part(a.name) for a in node.names if a.name.startswith("firmware."))
    return parts


def test_every_firmware_module_has_a_place_in_the_pipeline() -> None:
    for path in _sources("firmware"):
        rel = path.relative_to(ROOT / "firmware")
        part = rel.parts[0].removesuffix(".py")
        assert part in MAY_IMPORT or part == "__init__", (
            f"firmware/{rel} is in no layer: add it to MAY_IMPORT in tests/test_layering.py")


@pytest.mark.parametrize("path", _sources("firmware"), ids=lambda p: str(p.relative_to(ROOT)))
def test_firmware_parts_import_only_what_sits_below_them(path: Path) -> None:
    rel = path.relative_to(ROOT / "firmware")
    part = rel.parts[0].removesuffix(".py")
    if part == "__init__":
        return
    allowed = GROUND | MAY_IMPORT[part] | {part}
    bad = _firmware_imports(path) - allowed
    assert not bad, f"firmware/{rel} ({part}) imports {sorted(bad)}, above or beside it"


def _module_level_imports(path: Path) -> set[str]:
    """Top-level packages imported by statements that run at import (not inside functions)."""
    names: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.If | ast.Try | ast.With | ast.ClassDef):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return names


@pytest.mark.parametrize("path", _sources("service"), ids=lambda p: str(p.relative_to(ROOT)))
def test_service_never_imports_workers_at_module_level(path: Path) -> None:
    # DESIGN: the service enqueues work by task name; workers import the service, not back.
    assert "workers" not in _module_level_imports(path), path.relative_to(ROOT)


def test_the_dashboard_reaches_the_registry_as_the_api_does() -> None:
    # The dashboard's pages are views of the same functions the API calls (registry,
    # device_list, auth): never the API's view modules, whose answers are JSON documents.
    for path in _sources("service/dashboard"):
        tree = ast.parse(path.read_text(), filename=str(path))
        modules = {node.module for node in ast.walk(tree)
                   if isinstance(node, ast.ImportFrom) and node.module}
        views = {m for m in modules if m.startswith("service.api.") and m != "service.api.common"}
        assert not views, f"{path.relative_to(ROOT)} imports API views {sorted(views)}"
