"""The OpenAPI 3.1 document, built from the routes and the pydantic models they validate with
(requests) or answer in the shape of (responses): what is documented is what is checked."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, current_app
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.auth import MAX_TOKEN_ID, require
from service.models import Role
from service.schemas import (
    DEVICE_NAME_RE,
    FLEET_NAME_RE,
    IDEMPOTENCY_KEY_RE,
    MODEL_VERSION_RE,
    Problem,
)

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class RouteDoc:
    """What the OpenAPI document says about one view."""

    summary: str
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    idempotent: bool = False  # takes an Idempotency-Key header


def doc(summary: str, *, tag: str, body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None, response: type[BaseModel] | None = None,
        status: int = 200, idempotent: bool = False) -> Callable[[F], F]:
    """Attach OpenAPI facts to a view (its schemas are the ones it validates with)."""
    def decorator(view: F) -> F:
        view.route_doc = RouteDoc(summary, tag, body, query, response, status,  # type: ignore[attr-defined]
                                  idempotent)
        return view

    return decorator


bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

_ERRORS = {
    400: "malformed JSON",
    401: "no valid bearer token (unknown, revoked or expired)",
    403: "the token's role is too low",
    404: "no such resource",
    409: "a name is already taken, or a conflicting request is in progress",
    413: "too large (body over the route's limit, or over 10,000 rows)",
    414: "request URI over 4096 bytes",
    415: "the body is not application/json",
    422: "invalid fields, each named in `errors`",
    503: "the database is busy or unavailable; retry",
}

# Path parameters: what a value must look like to name anything at all.
_PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "/api/v1/devices/{key}": {"type": "string", "pattern": DEVICE_NAME_RE},
    "/api/v1/fleets/{name}": {"type": "string", "pattern": FLEET_NAME_RE},
    "/api/v1/tokens/{token_id}": {"type": "integer", "minimum": 1, "maximum": MAX_TOKEN_ID},
    "/api/v1/models/{version}": {"type": "string", "pattern": MODEL_VERSION_RE},
    "/api/v1/campaigns/{campaign_id}": {"type": "integer", "minimum": 0},
    "/api/v1/jobs/{job_id}": {"type": "integer", "minimum": 0},
}


def _ref(cls: type) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


def _path_schema(rule_path: str) -> dict[str, Any]:
    for prefix, schema in _PATH_SCHEMAS.items():
        if rule_path.startswith(prefix):
            return schema
    return {"type": "string"}


def _query_parameters(model: type[BaseModel], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    props = schemas[model.__name__]["properties"]
    required = set(schemas[model.__name__].get("required", []))
    params = []
    for name, prop in props.items():
        schema = {k: v for k, v in prop.items() if k not in ("title", "description")}
        params.append({"name": name, "in": "query", "required": name in required,
                       "description": prop.get("description", ""), "schema": schema})
    return params


def _operation(rule_path: str, method: str, view: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    info: RouteDoc = view.route_doc
    role: Role = view.required_role
    op: dict[str, Any] = {
        "summary": info.summary, "tags": [info.tag],
        "operationId": f"{method}_{view.__name__}_{info.tag}",
        "description": f"Needs role `{role.value}` or higher.",
        "security": [{"bearer": []}],
        "responses": {},
    }
    params = [{"name": name, "in": "path", "required": True,
               "schema": _path_schema(rule_path)}
              for name in re.findall(r"{(\w+)}", rule_path)]
    if info.query is not None:
        params.extend(_query_parameters(info.query, schemas))
    if info.idempotent:
        params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                       "description": "a unique key (e.g. a UUID) per request: a retry with "
                                      "the same key and body, within 24 h, gets the first "
                                      "answer's devices with passwords rotated again",
                       "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_RE}})
    if params:
        op["parameters"] = params
    if info.body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(info.body)}}}
    ok: dict[str, Any] = {"description": "success"}
    if info.response is not None:
        ok["content"] = {"application/json": {"schema": _ref(info.response)}}
    op["responses"][str(info.status)] = ok
    errors = [401, 403, 404, 414, 503] + ([400, 409, 413, 415, 422] if info.body else []) + (
        [422] if info.query else []) + ([409, 422] if info.idempotent or method == "post"
                                       else [])
    for code in sorted(set(errors)):
        op["responses"][str(code)] = {
            "description": _ERRORS[code],
            "content": {"application/problem+json": {"schema": _ref(Problem)}}}
    return op


def component_schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    """JSON Schemas of `models` and every model or enum they refer to, by name."""
    _, top = models_json_schema([(m, "validation") for m in models],
                                ref_template="#/components/schemas/{model}")
    return dict(sorted(top.get("$defs", {}).items()))


def build_openapi(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every /api/v1 route of `app`."""
    routes: list[tuple[str, str, Any]] = []
    models: list[type[BaseModel]] = [Problem]
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith("/api/v1"):
            continue
        view = app.view_functions[rule.endpoint]
        if not hasattr(view, "route_doc"):
            raise TypeError(f"route {rule.rule} ({rule.endpoint}) has no @doc")
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((path, method.lower(), view))
        info: RouteDoc = view.route_doc
        models.extend(m for m in (info.body, info.query, info.response)
                      if m is not None and m not in models)
    schemas = component_schemas(models)
    paths: dict[str, Any] = {}
    for path, method, view in routes:
        paths.setdefault(path, {})[method] = _operation(path, method, view, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tinyfleet API", "version": "1",
                 "description": "Register MCU fleets and deploy patch-scheduled int8 models "
                                "to them. Errors are application/problem+json (RFC 9457) "
                                "with an `errors` list naming each field."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "`tinyfleet tokens create`"}},
        },
        "security": [{"bearer": []}],
    }


@bp.get("/openapi.json")
@doc("This OpenAPI document", tag="meta")
@require(Role.VIEWER)
def openapi_view() -> dict[str, Any]:
    """The OpenAPI document."""
    return build_openapi(current_app._get_current_object())  # type: ignore[attr-defined]
