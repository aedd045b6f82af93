"""The OpenAPI 3.1 document, built from the routes and the schemas they validate with."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, current_app

from service.auth import require
from service.models import Role
from service.validation import field_types, json_schema, nested_schemas, object_schema

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class RouteDoc:
    """What the OpenAPI document says about one view."""

    summary: str
    tag: str
    body: type | None = None
    query: type | None = None
    response: type | None = None
    status: int = 200


def doc(summary: str, *, tag: str, body: type | None = None, query: type | None = None,
        response: type | None = None, status: int = 200) -> Callable[[F], F]:
    """Attach OpenAPI facts to a view (its schemas are the ones it validates with)."""
    def decorator(view: F) -> F:
        view.route_doc = RouteDoc(summary, tag, body, query, response, status)  # type: ignore[attr-defined]
        return view

    return decorator


bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

_ERRORS = {
    400: "malformed JSON",
    401: "no valid bearer token",
    403: "the token's role is too low",
    404: "no such resource",
    409: "a name is already taken",
    413: "too large (body or bulk row count)",
    415: "the body is not application/json",
    422: "invalid fields, each named in `errors`",
}


def _ref(cls: type) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


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
    params = []
    for name in re.findall(r"{(\w+)}", rule_path):
        params.append({"name": name, "in": "path", "required": True,
                       "schema": {"type": "string"}})
    if info.query is not None:
        hints = field_types(info.query)
        for f in dataclasses.fields(info.query):
            meta = f.metadata["meta"]
            params.append({"name": f.name, "in": "query", "required": False,
                           "description": meta.description,
                           "schema": json_schema(hints[f.name], meta)})
    if params:
        op["parameters"] = params
    if info.body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(info.body)}}}
    ok: dict[str, Any] = {"description": "success"}
    if info.response is not None:
        ok["content"] = {"application/json": {"schema": _ref(info.response)}}
    op["responses"][str(info.status)] = ok
    errors = [401, 403, 404] + ([400, 409, 413, 415, 422] if info.body else []) + (
        [422] if info.query else [])
    for code in sorted(set(errors)):
        op["responses"][str(code)] = {
            "description": _ERRORS[code],
            "content": {"application/problem+json": {"schema": _ref(_problem())}}}
    for cls in (info.body, info.query, info.response, _problem()):
        if cls is not None and cls is not info.query:
            for nested in nested_schemas(cls):
                schemas[nested.__name__] = object_schema(nested)
    return op


def _problem() -> type:
    from service.schemas import Problem

    return Problem


def build_openapi(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every /api/v1 route of `app`."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith("/api/v1"):
            continue
        view = app.view_functions[rule.endpoint]
        if not hasattr(view, "route_doc"):
            raise TypeError(f"route {rule.rule} ({rule.endpoint}) has no @doc")
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(path, method.lower(), view,
                                                                    schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tinyfleet API", "version": "1",
                 "description": "Register MCU fleets and deploy patch-scheduled int8 models "
                                "to them. Errors are application/problem+json (RFC 9457) "
                                "with an `errors` list naming each field."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
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
