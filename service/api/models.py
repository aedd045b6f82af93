"""/api/v1/models: register (upload or server path), list and get model versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, g, request

from service.api.common import API_PREFIX, json_body
from service.api.openapi import doc
from service.auth import require
from service.db import request_session
from service.jobs import Enqueue
from service.limits import body_limit, read_body
from service.model_versions import (
    find_model,
    list_models,
    model_json,
    register_path,
    register_upload,
)
from service.models import Role
from service.parsing import validate
from service.problems import ApiError, FieldError
from service.queue import enqueue
from service.schemas import (
    ModelRegister,
    ModelUploadForm,
    ModelVersionList,
    ModelVersionOut,
    ModelVersionRegistered,
)

bp = Blueprint("models", __name__, url_prefix=f"{API_PREFIX}/models")


def _var_dir() -> Path:
    return Path(current_app.config["VAR_DIR"])


def _queue() -> Enqueue | None:
    """The task queue, or None without one (the reconciler queues the analysis later)."""
    return enqueue if current_app.config.get("REDIS_URL") else None


@bp.post("")
@doc("Register a model version: multipart/form-data (name, file: a family archive or an "
     ".onnx file) or JSON (name, path on the server; admin)", body=ModelRegister,
     response=ModelVersionRegistered, status=201, tag="models")
@body_limit("MODEL_UPLOAD_MAX_BYTES")
@require(Role.OPERATOR)
def register_view() -> tuple[dict[str, Any], int]:
    """Register an upload or a server path; 200 when the content was registered before."""
    session = request_session()
    if request.mimetype == "multipart/form-data":
        read_body()  # the route's size limit applies to the whole upload
        form = validate(ModelUploadForm, {k: _form_value(k, v)
                                          for k, v in request.form.items()})
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise ApiError(422, "file: missing (a .tar.gz/.zip of a family, or an .onnx)",
                           [FieldError("file", "is missing")])
        data = upload.read()
        limit = int(current_app.config["MODEL_UPLOAD_MAX_BYTES"])
        result = register_upload(session, _var_dir(), form.name, upload.filename, data,
                                 form.analyze, _queue(), max_unpacked=4 * limit)
    else:
        spec = validate(ModelRegister, json_body())
        if not g.api_token.role.allows(Role.ADMIN):
            raise ApiError(403, "registering a path on the server needs the admin role",
                           [FieldError("path", "needs role admin")])
        result = register_path(session, _var_dir(), spec.name, spec.path, spec.analyze,
                               _queue())
    body = {"model": model_json(result.model), "created": result.created}
    return body, 201 if result.created else 200


def _form_value(key: str, value: str) -> Any:
    if key == "analyze":
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
    return value


@bp.get("")
@doc("List model versions", response=ModelVersionList, tag="models")
@require(Role.VIEWER)
def list_view() -> dict[str, Any]:
    """Every model version, newest first."""
    return {"items": [model_json(m) for m in list_models(request_session())]}


@bp.get("/<version>")
@doc("Get a model version", response=ModelVersionOut, tag="models")
@require(Role.VIEWER)
def get_view(version: str) -> dict[str, Any]:
    """One model version."""
    return model_json(find_model(request_session(), version))
