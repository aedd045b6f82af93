"""Validation of requests against the pydantic schemas, with every failure turned into a
FieldError naming the field (and the row of a bulk request) in the house's words."""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from service.problems import ApiError, FieldError

M = TypeVar("M", bound=BaseModel)
SHOWN_CHARS = 40  # a value quoted in a message is cut to this many characters


def validate(model: type[M], data: Any) -> M:
    """`data` (parsed JSON or a query dict) as `model`, or ApiError 422 naming every field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = field_errors(err, model)
        raise ApiError(422, summary(errors), errors) from None


def validate_rows(model: type[M], rows: list[Any]) -> tuple[list[M | None], list[FieldError]]:
    """Each row as `model` (None where it fails) and the errors, each with its row index."""
    adapter = _list_adapter(model)
    try:
        return list(adapter.validate_python(rows)), []
    except ValidationError as err:
        errors = field_errors(err, model, rows=True)
    bad = {e.index for e in errors}
    parsed: list[M | None] = []
    for i, raw in enumerate(rows):
        # Rows without errors are parsed one by one, so that later checks see them too.
        parsed.append(None if i in bad else model.model_validate(raw))
    return parsed, errors


_ADAPTERS: dict[type[BaseModel], TypeAdapter[Any]] = {}


def _list_adapter(model: type[BaseModel]) -> TypeAdapter[Any]:
    if model not in _ADAPTERS:
        _ADAPTERS[model] = TypeAdapter(list[model])  # type: ignore[valid-type]
    return _ADAPTERS[model]


def summary(errors: list[FieldError]) -> str:
    """The problem's `detail`: the first error, and how many more there are."""
    first = errors[0]
    where = f"row {first.index}: " if first.index is not None else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}{first.field}: {first.message}{more}"


def field_errors(err: ValidationError, model: type[BaseModel], *,
                 rows: bool = False) -> list[FieldError]:
    """FieldErrors of a pydantic ValidationError; with `rows`, loc[0] is a row index.

    A body's list of rows (`devices` of a bulk request) also gets row indices: `index` is
    the row, `field` the field within it.
    """
    out: list[FieldError] = []
    for e in err.errors(include_url=False, include_context=True, include_input=True):
        loc: list[int | str] = list(e["loc"])
        index: int | None = None
        if rows and loc and isinstance(loc[0], int):
            index = int(loc.pop(0))
        elif len(loc) >= 2 and isinstance(loc[1], int) and _is_row_list(model, loc[0]):
            index = int(loc[1])
            loc = loc[2:] if len(loc) > 2 else [f"{loc[0]}[{index}]"]
        path = _path(loc) if loc else ("body" if index is None else f"row {index}")
        out.append(FieldError(path, message(e, _model_at(model, e["loc"], rows)), index))
    return out


def _is_row_list(model: type[BaseModel], name: Any) -> bool:
    # A list of models inside a body is a list of rows (bulk registration).
    info = model.model_fields.get(str(name))
    return info is not None and _item_model(info.annotation) is not None


def _item_model(annotation: Any) -> type[BaseModel] | None:
    for arg in typing.get_args(annotation) or ():
        found = _item_model(arg)
        if found is not None:
            return found
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...],
              rows: bool) -> type[BaseModel]:
    """The model whose field `loc` names (for the list of known fields)."""
    current = model
    for part in loc[1:] if rows else loc:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        if info is None:
            break
        nested = _item_model(info.annotation) or _plain_model(info.annotation)
        if nested is None:
            break
        current = nested
    return current


def _plain_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def shown(value: Any) -> str:
    """A value as quoted in a message: repr of strings cut short, else the type name."""
    if isinstance(value, str):
        return repr(value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "...")
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "null"
    if isinstance(value, int):
        digits = len(str(abs(value)))
        return str(value) if digits <= SHOWN_CHARS else f"an integer of {digits} digits"
    return _kind(value)


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def message(e: ErrorDetails, model: type[BaseModel]) -> str:
    """One pydantic error in the house's words: what is wrong, with the value and the limit."""
    kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return f"unknown field; known: {', '.join(model.model_fields)}"
    if kind in ("string_type", "int_type", "bool_type", "list_type", "model_type",
                "dict_type", "model_attributes_type", "int_parsing", "bool_parsing"):
        wanted = {"string_type": "a string", "int_type": "an integer",
                  "int_parsing": "an integer", "bool_type": "true or false",
                  "bool_parsing": "true or false", "list_type": "a list"}.get(kind,
                                                                             "a JSON object")
        return f"must be {wanted}, got {_kind(value)}"
    if kind == "string_unicode":
        return "is not valid Unicode text (it holds a lone surrogate)"
    if kind == "string_pattern_mismatch":
        return f"{shown(value)} does not match {ctx.get('pattern')}"
    if kind == "string_too_long":
        return (f"is {len(value) if isinstance(value, str) else '?'} characters long, "
                f"the limit is {ctx.get('max_length')}")
    if kind == "too_long":
        return f"has {ctx.get('actual_length')} items, the limit is {ctx.get('max_length')}"
    if kind == "greater_than_equal":
        return f"{shown(value)} is below the minimum {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"{shown(value)} is above the maximum {ctx.get('le')}"
    if kind in ("enum", "literal_error"):
        return f"{shown(value)} is not one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(e["msg"]).removeprefix("Value error, ")
    return str(e["msg"])
