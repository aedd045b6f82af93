"""Small dataclass schemas: parse JSON or query strings into them, and describe them as JSON
Schema for the OpenAPI document, so that what is validated is what is documented.

A schema is a frozen dataclass whose fields carry `meta(...)`: a description and limits.
Supported field types: str, int, bool, enums, list[str], list[<schema>], dict, and `X | None`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from firmware.targets import parse_size
from service.problems import ApiError, FieldError

T = TypeVar("T")


@dataclass(frozen=True)
class Meta:
    """Description and limits of one schema field."""

    description: str
    minimum: int | None = None
    maximum: int | None = None
    pattern: str | None = None
    max_length: int | None = None
    max_items: int | None = None
    size: bool = False  # an int of bytes, also given as "256KiB" / "1MiB"
    example: Any = None
    # Values checked by the caller instead (so that the error can list e.g. known MCUs).
    enum_values: tuple[str, ...] | None = None


def meta(description: str, **kwargs: Any) -> dict[str, Meta]:
    """Field metadata for a schema dataclass: `field(default=..., metadata=meta(...))`."""
    return {"meta": Meta(description, **kwargs)}


class _Missing:
    pass


MISSING = _Missing()


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of a schema dataclass."""
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_meta(f: dataclasses.Field[Any]) -> Meta:
    return f.metadata.get("meta") or Meta(f.name)


def _int(value: Any, m: Meta, from_text: bool) -> tuple[Any, str | None]:
    if isinstance(value, str) and (m.size or from_text):
        try:
            value = parse_size(value) if m.size else int(value)
        except ValueError:
            what = "a size such as 262144, 256KiB or 1MiB" if m.size else "an integer"
            return None, f"must be {what}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"must be an integer, got {type(value).__name__}"
    if m.minimum is not None and value < m.minimum:
        return None, f"{value} is below the minimum {m.minimum}"
    if m.maximum is not None and value > m.maximum:
        return None, f"{value} is above the maximum {m.maximum}"
    return value, None


def _str(value: Any, m: Meta) -> tuple[Any, str | None]:
    if not isinstance(value, str):
        return None, f"must be a string, got {type(value).__name__}"
    if m.max_length is not None and len(value) > m.max_length:
        return None, f"is {len(value)} characters long, the limit is {m.max_length}"
    if m.pattern is not None and not re.fullmatch(m.pattern, value):
        return None, f"{value!r} does not match {m.pattern}"
    return value, None


def _bool(value: Any, from_text: bool) -> tuple[Any, str | None]:
    if from_text and isinstance(value, str) and value.lower() in _TEXT_BOOLS:
        return _TEXT_BOOLS[value.lower()], None
    return (value, None) if isinstance(value, bool) else (None, "must be true or false")


_TEXT_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _scalar(tp: Any, value: Any, m: Meta, from_text: bool) -> tuple[Any, str | None]:
    """(converted value, None) or (None, what is wrong) for bool, int, str and enums."""
    if tp is bool:
        return _bool(value, from_text)
    if tp is int:
        return _int(value, m, from_text)
    if tp is str:
        return _str(value, m)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [e.value for e in tp]
        if value not in allowed:
            return None, f"{value!r} is not one of {', '.join(map(str, allowed))}"
        return tp(value), None
    raise TypeError(f"unsupported schema type {tp!r}")


def _convert(tp: Any, value: Any, m: Meta, path: str, errors: list[FieldError],
             index: int | None, from_text: bool) -> Any:
    """`value` as type `tp`, or MISSING after appending an error naming `path`."""
    problem: str | None
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problem = f"must be a list, got {type(value).__name__}"
        elif m.max_items is not None and len(value) > m.max_items:
            problem = f"has {len(value)} items, the limit is {m.max_items}"
        else:
            before = len(errors)
            item_meta = dataclasses.replace(m, max_items=None)
            items = [_convert(item_tp, v, item_meta, f"{path}[{i}]", errors, index, from_text)
                     for i, v in enumerate(value)]
            return MISSING if len(errors) > before else items
    elif dataclasses.is_dataclass(tp):
        return parse_into(tp, value, errors, index=index, prefix=path + ".")  # type: ignore[arg-type]
    elif tp is dict or typing.get_origin(tp) is dict:
        if isinstance(value, dict):
            return value
        problem = "must be an object"
    else:
        converted, problem = _scalar(tp, value, m, from_text)
        if problem is None:
            return converted
    errors.append(FieldError(path, problem or "is invalid", index))
    return MISSING


def parse_into(cls: type[T], data: Any, errors: list[FieldError], *, index: int | None = None,
               prefix: str = "", from_text: bool = False) -> T | _Missing:
    """`data` parsed into schema `cls`; problems are appended to `errors` (MISSING then)."""
    if not isinstance(data, dict):
        errors.append(FieldError(prefix.rstrip(".") or "body",
                                 f"must be a JSON object, got {type(data).__name__}", index))
        return MISSING
    before = len(errors)
    hints = field_types(cls)  # type: ignore[arg-type]  # dataclasses are hashable
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            errors.append(FieldError(f"{prefix}{key}",
                                     f"unknown field; known: {', '.join(fields)}", index))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        tp, optional = _unwrap_optional(hints[name])
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        if name not in data or (from_text and data[name] == ""):
            if required:
                errors.append(FieldError(prefix + name, "is required", index))
            continue
        value = data[name]
        if value is None:
            if not optional:
                errors.append(FieldError(prefix + name, "must not be null", index))
            else:
                values[name] = None
            continue
        converted = _convert(tp, value, _field_meta(f), prefix + name, errors, index, from_text)
        if converted is not MISSING:
            values[name] = converted
    if len(errors) > before:
        return MISSING
    return cls(**values)


def parse(cls: type[T], data: Any, *, from_text: bool = False) -> T:
    """`data` as schema `cls`, or ApiError 422 listing every field at fault."""
    errors: list[FieldError] = []
    result = parse_into(cls, data, errors, from_text=from_text)
    if isinstance(result, _Missing):
        raise ApiError(422, _summary(errors), errors)
    return result


def _summary(errors: list[FieldError]) -> str:
    first = errors[0]
    where = f"row {first.index}: " if first.index is not None else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}{first.field}: {first.message}{more}"


def json_schema(tp: Any, m: Meta | None = None) -> dict[str, Any]:
    """JSON Schema (2020-12, as OpenAPI 3.1 uses) of a schema type."""
    tp, optional = _unwrap_optional(tp)
    out: dict[str, Any]
    if dataclasses.is_dataclass(tp):
        out = {"$ref": f"#/components/schemas/{tp.__name__}"}  # type: ignore[union-attr]
    elif tp is bool:
        out = {"type": "boolean"}
    elif tp is int:
        out = {"type": "integer"}
        if m and m.size:
            out = {"oneOf": [{"type": "integer"}, {"type": "string",
                                                   "pattern": r"^[0-9.]+\s*[KkMm]?i?[Bb]?$"}]}
    elif tp is str:
        out = {"type": "string"}
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        out = {"type": "string", "enum": [e.value for e in tp]}
    elif typing.get_origin(tp) is list:
        # Item limits (pattern, length) go to the items, the count to the array.
        item_meta = dataclasses.replace(m, max_items=None, description="") if m else None
        items = json_schema(typing.get_args(tp)[0], item_meta)
        items.pop("description", None)
        out = {"type": "array", "items": items}
        if m is not None:
            m = Meta(m.description, max_items=m.max_items)
    elif tp is dict or typing.get_origin(tp) is dict:
        out = {"type": "object"}
    else:
        raise TypeError(f"unsupported schema type {tp!r}")
    if m is not None:
        out["description"] = m.description
        # A size's limits belong to its integer form (the string form is parsed to one).
        target = out["oneOf"][0] if "oneOf" in out else out
        for attr, key in (("minimum", "minimum"), ("maximum", "maximum"),
                          ("pattern", "pattern"), ("max_length", "maxLength"),
                          ("max_items", "maxItems"), ("example", "examples")):
            value = getattr(m, attr)
            if value is not None and "$ref" not in out:
                target[key] = ([value] if key == "examples" else
                               f"^(?:{value})$" if key == "pattern" else value)
        if m.enum_values:
            out["enum"] = list(m.enum_values)
    if optional:
        out = {"anyOf": [out, {"type": "null"}]}
        if m is not None:
            out["description"] = m.description
    return out


def object_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema object of a schema dataclass (its components entry)."""
    hints = field_types(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        props[f.name] = json_schema(hints[f.name], _field_meta(f))
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        elif f.default is not dataclasses.MISSING and f.default is not None:
            default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            props[f.name]["default"] = default
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "additionalProperties": False}
    if cls.__doc__:
        out["description"] = cls.__doc__.strip().splitlines()[0]
    if required:
        out["required"] = required
    return out


def nested_schemas(cls: type) -> list[type]:
    """`cls` and every schema dataclass it refers to."""
    found: list[type] = []

    def visit(tp: Any) -> None:
        tp, _ = _unwrap_optional(tp)
        if typing.get_origin(tp) is list:
            visit(typing.get_args(tp)[0])
        elif dataclasses.is_dataclass(tp) and tp not in found:
            found.append(tp)  # type: ignore[arg-type]
            for hint in field_types(tp).values():  # type: ignore[arg-type]
                visit(hint)

    visit(cls)
    return found
