"""Model versions: register a family (an uploaded archive or a directory on the server) or
a fixed ONNX model; immutable and content-addressed.

A family's version is its own (16 hex digits of the sha256 of supernet.pt); an ONNX model's
is 16 hex digits of the file's sha256. The files are copied under VAR_DIR/models/<version>/
once (written beside, renamed into place); registering the same content again returns the
existing version. Archives are unpacked member by member: absolute paths, `..`, links and
special files are refused with 422 naming the member, and so is anything past the size cap.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.jobs import ANALYZE_TASK, Enqueue
from service.models import AnalysisState, ModelKind, ModelVersion
from service.problems import ApiError, FieldError, invalid

MODELS_DIR = "models"
FAMILY_FILES = ("family.json", "supernet.pt")
MAX_MEMBERS = 64


@dataclass(frozen=True)
class Registered:
    """A model version and whether this call created it."""

    model: ModelVersion
    created: bool


def _models_root(var_dir: Path) -> Path:
    root = var_dir / MODELS_DIR
    root.mkdir(parents=True, exist_ok=True)
    return root


def _member_path(name: str, field: str) -> PurePosixPath:
    """A member's relative path; 422 for absolute paths and `..`."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or name.startswith("/"):
        raise invalid(field, f"archive member {name!r} leaves the archive's directory "
                             "(absolute path or '..'); refused")
    return path


def unpack_archive(data: bytes, dest: Path, max_bytes: int, field: str = "file") -> None:
    """Unpack a .tar(.gz) or .zip into `dest`, checking every member first."""
    buffer = io.BytesIO(data)
    if zipfile.is_zipfile(buffer):
        with zipfile.ZipFile(buffer) as archive:
            infos = archive.infolist()
            _check_count(len(infos), field)
            total = 0
            for info in infos:
                path = _member_path(info.filename, field)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise invalid(field, f"archive member {info.filename!r} is a link; refused")
                total += info.file_size
                if total > max_bytes:
                    raise invalid(field, f"the archive unpacks to more than {max_bytes} bytes")
                if info.is_dir():
                    continue
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
        return
    buffer.seek(0)
    try:
        opened = tarfile.open(fileobj=buffer, mode="r:*")  # noqa: SIM115 (closed below)
    except tarfile.TarError:
        raise invalid(field, "not an archive (.tar.gz, .tgz, .tar or .zip of a family "
                             "directory) and not an .onnx file") from None
    with opened as tar:
        members = tar.getmembers()
        _check_count(len(members), field)
        total = 0
        for member in members:
            _member_path(member.name, field)
            if not (member.isfile() or member.isdir()):
                raise invalid(field, f"archive member {member.name!r} is a link or a special "
                                     "file; refused")
            total += member.size
            if total > max_bytes:
                raise invalid(field, f"the archive unpacks to more than {max_bytes} bytes")
        tar.extractall(dest, members=members, filter="data")


def _check_count(count: int, field: str) -> None:
    if count > MAX_MEMBERS:
        raise invalid(field, f"the archive has {count} members; a family has a few "
                             f"(at most {MAX_MEMBERS})")


def _family_root(unpacked: Path, field: str) -> Path:
    """The directory holding family.json: the top, or its only subdirectory."""
    if (unpacked / "family.json").is_file():
        return unpacked
    subdirs = [p for p in unpacked.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "family.json").is_file():
        return subdirs[0]
    raise invalid(field, "no family.json at the top of the archive or in its only directory "
                         "(archive a `train-supernet --out DIR` directory)")


def family_summary(directory: Path, field: str) -> tuple[str, dict[str, Any]]:
    """(version, summary) of a family directory; 422 when it is not a sound family."""
    from firmware.errors import FirmwareError
    from firmware.nas.family import read_manifest, weights_version

    try:
        family = read_manifest(directory)
    except FirmwareError as exc:
        raise invalid(field, str(exc)) from None
    weights = directory / "supernet.pt"
    if not weights.is_file():
        raise invalid(field, "the family has no supernet.pt")
    actual = weights_version(weights)
    if actual != family.version:
        raise invalid(field, f"supernet.pt has version {actual}, family.json says "
                             f"{family.version}: the family was changed")
    return family.version, {"family": family.name, "space": family.space.name,
                            "resolutions": list(family.space.resolutions),
                            "classes": list(family.classes)}


def onnx_summary(data: bytes, field: str) -> dict[str, Any]:
    """A summary of an ONNX model; 422 when it does not parse."""
    import onnx

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... : all mean 422
        raise invalid(field, f"not a valid ONNX model: {str(exc)[:200]}") from None
    return {"graph": model.graph.name, "opset": [o.version for o in model.opset_import][:1],
            "nodes": len(model.graph.node)}


def _store(session: Session, var_dir: Path, version: str, name: str, kind: ModelKind,
           staged: Path, summary: dict[str, Any], analyze: bool,
           enqueue: Enqueue | None) -> Registered:
    """Move `staged` to models/<version> and insert the row (or return the existing one)."""
    existing = session.get(ModelVersion, version)
    if existing is not None:
        shutil.rmtree(staged, ignore_errors=True)
        return Registered(existing, False)
    final = _models_root(var_dir) / version
    if final.exists():
        shutil.rmtree(staged, ignore_errors=True)  # same content, from an earlier attempt
    else:
        staged.rename(final)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    state = AnalysisState.NONE
    if kind is ModelKind.FAMILY:
        from firmware.personalize import contributions_path

        if contributions_path(var_dir, version).is_file():
            state = AnalysisState.DONE
        elif analyze:
            state = AnalysisState.QUEUED
    row = ModelVersion(id=version, name=name, kind=kind, path=str(final.resolve()),
                       size_bytes=size, analysis_state=state, info=json.dumps(summary))
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # registered concurrently: the same content, so the same row
        session.rollback()
        found = session.get(ModelVersion, version)
        assert found is not None
        return Registered(found, False)
    if state is AnalysisState.QUEUED and enqueue is not None:
        enqueue(ANALYZE_TASK, [version])
    return Registered(row, True)


def register_upload(session: Session, var_dir: Path, name: str, filename: str, data: bytes,
                    analyze: bool, enqueue: Enqueue | None, max_unpacked: int) -> Registered:
    """Register an uploaded .onnx file or family archive."""
    staged = Path(tempfile.mkdtemp(prefix=".upload-", dir=_models_root(var_dir)))
    try:
        if filename.lower().endswith(".onnx"):
            summary = onnx_summary(data, "file")
            version = hashlib.sha256(data).hexdigest()[:16]
            (staged / "model.onnx").write_bytes(data)
            return _store(session, var_dir, version, name, ModelKind.ONNX, staged, summary,
                          analyze, enqueue)
        unpack_archive(data, staged / "unpacked", max_unpacked)
        root = _family_root(staged / "unpacked", "file")
        version, summary = family_summary(root, "file")
        family_dir = staged / "family"
        root.rename(family_dir)
        for extra in list(family_dir.iterdir()):  # keep what a family is, nothing else
            if extra.name not in FAMILY_FILES:
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
        shutil.rmtree(staged / "unpacked", ignore_errors=True)
        return _store(session, var_dir, version, name, ModelKind.FAMILY, staged, summary,
                      analyze, enqueue)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def register_path(session: Session, var_dir: Path, name: str, path_text: str, analyze: bool,
                  enqueue: Enqueue | None) -> Registered:
    """Register a family directory or an .onnx file that is already on the server."""
    path = Path(path_text)
    if not path.is_absolute():
        raise invalid("path", f"{path_text!r} is not an absolute path")
    if not path.exists():
        raise invalid("path", f"{path_text} does not exist on the server")
    staged = Path(tempfile.mkdtemp(prefix=".path-", dir=_models_root(var_dir)))
    try:
        if path.is_file():
            data = path.read_bytes()
            if not path.name.lower().endswith(".onnx"):
                raise invalid("path", f"{path_text} is a file but not an .onnx model")
            summary = onnx_summary(data, "path")
            (staged / "model.onnx").write_bytes(data)
            return _store(session, var_dir, hashlib.sha256(data).hexdigest()[:16], name,
                          ModelKind.ONNX, staged, summary, analyze, enqueue)
        version, summary = family_summary(path, "path")
        (staged / "family").mkdir()
        for file_name in FAMILY_FILES:
            shutil.copy2(path / file_name, staged / "family" / file_name)
        return _store(session, var_dir, version, name, ModelKind.FAMILY, staged, summary,
                      analyze, enqueue)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def model_path(model: ModelVersion) -> Path:
    """The family directory or .onnx file of a version."""
    root = Path(model.path)
    return root / ("family" if model.kind is ModelKind.FAMILY else "model.onnx")


def find_model(session: Session, version: str) -> ModelVersion:
    """A version by id; 404."""
    row = session.get(ModelVersion, version)
    if row is None:
        raise ApiError(404, f"no model version {version!r}",
                       [FieldError("id", "no such model version")])
    return row


def list_models(session: Session) -> list[ModelVersion]:
    """Every version, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(
        ModelVersion.created_at.desc(), ModelVersion.id)).all())


def model_json(model: ModelVersion) -> dict[str, Any]:
    """A version (schema ModelVersionOut)."""
    from service.campaigns import iso

    return {"id": model.id, "name": model.name, "kind": model.kind.value,
            "size_bytes": model.size_bytes, "analysis": model.analysis_state.value,
            "analysis_reason": model.analysis_reason, "info": json.loads(model.info),
            "created_at": iso(model.created_at)}
