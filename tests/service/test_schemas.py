"""The pydantic request schemas and the OpenAPI document built from them agree: a value the
document rejects is rejected, and one it accepts is accepted (sizes aside: the document can
only say which strings are sizes, not which sizes are in range)."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from firmware.targets import MAX_SRAM_BYTES, MIN_SRAM_BYTES, Cpu, OtaLayout
from service.api.openapi import component_schemas
from service.parsing import field_errors
from service.schemas import (
    CredentialRotation,
    DeviceBulkCreate,
    DeviceCreate,
    DeviceQuery,
    FleetCreate,
    TokenCreate,
    parse_size_value,
)

pytestmark = pytest.mark.unit

MODELS: list[type[BaseModel]] = [DeviceCreate, DeviceBulkCreate, FleetCreate, TokenCreate,
                                 CredentialRotation]
SCHEMAS = component_schemas(MODELS)


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    # JSON Schema patterns are ECMA-262: `$` is the end of the text. Python's re.search lets
    # `$` match before a final newline, which jsonschema inherits; pydantic (Rust regex)
    # follows ECMA. Compare against ECMA.
    if isinstance(instance, str) and not re.search(pattern.replace("$", r"\Z"), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                         {"pattern": _ecma_pattern})


REGISTRY: Registry[Any] = Registry().with_resource(
    "urn:openapi", Resource({"components": {"schemas": SCHEMAS}}, DRAFT202012))
VALIDATORS = {m: Validator({"$ref": f"urn:openapi#/components/schemas/{m.__name__}"},
                           registry=REGISTRY) for m in MODELS}


def _surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(_surrogates(v) or _surrogates(k) for k, v in value.items())
    if isinstance(value, list):
        return any(_surrogates(v) for v in value)
    return False


def document_accepts(model: type[BaseModel], value: Any) -> bool:
    """Whether the OpenAPI document's schema of `model` accepts `value`.

    A lone surrogate is not Unicode text, so no JSON Schema string holds one (RFC 8259
    leaves it undefined; I-JSON forbids it): the document rejects it, as validation does.
    """
    return not _surrogates(value) and bool(VALIDATORS[model].is_valid(value))


def model_accepts(model: type[BaseModel], value: Any) -> bool:
    try:
        model.model_validate(value)
    except ValidationError:
        return False
    return True


TEXT = st.text(alphabet=st.sampled_from([*"aZ09-._:= \n\t\x00éDdEeVv/", "\ud800"]),
               max_size=20)
JSONISH = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), st.integers(-10**6, 10**11).map(float), TEXT,
                    st.lists(TEXT, max_size=3))
SIZE_TEXT = st.from_regex(r"\A[ 0-9.eE+-]{0,6}[0-9]{1,13}(KiB|kB|K|M|MB|MiB|B|GiB| KiB|)?[ \n]?\Z")


@settings(max_examples=150, deadline=None)
@given(name=st.one_of(TEXT, st.just("dev-0123456789abcdef"), st.just("DEV-0123456789ABCDEF")),
       fleet=TEXT, tags=st.lists(TEXT, max_size=3), layout=st.sampled_from(
           ["ab", "single", "AB", "", "x"]), extra=st.dictionaries(
           st.sampled_from(["mcu", "cpu", "colour"]), JSONISH, max_size=2))
def test_device_rows_agree(name: str, fleet: str, tags: list[str], layout: str,
                           extra: dict[str, Any]) -> None:
    row = {"name": name, "fleet": fleet, "tags": tags, "ota_layout": layout, **extra}
    assert document_accepts(DeviceCreate, row) == model_accepts(DeviceCreate, row), row


@settings(max_examples=150, deadline=None)
@given(size=st.one_of(SIZE_TEXT, JSONISH))
def test_sizes_agree_where_the_document_can_say(size: Any) -> None:
    row = {"name": "a", "fleet": "f", "sram_bytes": size, "flash_bytes": "1MiB",
           "cpu": "cortex-m4"}
    documented, validated = document_accepts(DeviceCreate, row), model_accepts(DeviceCreate,
                                                                                row)
    if not documented:
        assert not validated, size  # never accept what the document rejects
    elif not validated:  # a well-formed size out of range: the string form's limit
        assert isinstance(size, str)
        assert not MIN_SRAM_BYTES <= parse_size_value(size) <= MAX_SRAM_BYTES


@settings(max_examples=100, deadline=None)
@given(name=TEXT, description=st.one_of(TEXT, st.text(max_size=600)))
def test_fleets_agree(name: str, description: str) -> None:
    body = {"name": name, "description": description}
    assert document_accepts(FleetCreate, body) == model_accepts(FleetCreate, body), body


@settings(max_examples=100, deadline=None)
@given(role=st.sampled_from(["viewer", "admin", "root", ""]), name=TEXT,
       expires=st.one_of(st.none(), st.integers(-10, 10**10), st.booleans(), TEXT))
def test_tokens_agree(role: str, name: str, expires: Any) -> None:
    body = {"role": role, "name": name, "expires_in_s": expires}
    assert document_accepts(TokenCreate, body) == model_accepts(TokenCreate, body), body


@settings(max_examples=150, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["devices", "fleet", "tag", "mcu", "x"]),
                            st.one_of(JSONISH, st.sampled_from(
                                ["gh-1", "rp2040", ["gh-1"], ["a", "b"], [], "custom"])),
                            max_size=3))
def test_rotation_selections_agree(body: dict[str, Any]) -> None:
    assert document_accepts(CredentialRotation, body) == model_accepts(CredentialRotation,
                                                                        body), body


JSON_SCHEMA_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "description", "title", "items",
    "maxItems", "minItems", "pattern", "minimum", "maximum", "maxLength", "minLength", "enum",
    "default", "examples", "anyOf", "oneOf", "not", "$ref"}


def _keywords(schema: Any) -> set[str]:
    out: set[str] = set()
    for key, value in schema.items():
        if key == "properties":
            for prop in value.values():
                out |= _keywords(prop)
        elif key in ("items", "not"):
            out |= _keywords(value)
        elif key in ("anyOf", "oneOf"):
            for sub in value:
                out |= _keywords(sub)
        else:
            out.add(key)
    return out


def test_the_document_uses_only_json_schema_keywords() -> None:
    # A pydantic constraint it cannot express comes out as its own name ("ge"): ignored by
    # every JSON Schema reader, so the document would promise less than is checked.
    schemas = component_schemas([*MODELS, DeviceQuery])
    for name, schema in schemas.items():
        assert _keywords(schema) <= JSON_SCHEMA_KEYWORDS, name


def test_known_cases() -> None:
    ok = {"name": "a", "fleet": "f", "sram_bytes": "256KiB", "flash_bytes": 1 << 20,
          "cpu": "cortex-m4"}
    row = DeviceCreate.model_validate(ok)
    assert row.sram_bytes == 256 * 1024 and row.cpu is Cpu.CORTEX_M4
    assert row.ota_layout is OtaLayout.AB and row.tags == [] and row.mcu is None
    for bad in ("1e400", "1e400KiB", "1e3KiB", "2048.7", " 64 KiB ", "64KiB\n", 2048.5,
                float("inf"), True):
        assert not model_accepts(DeviceCreate, {**ok, "sram_bytes": bad}), bad
        assert not document_accepts(DeviceCreate, {**ok, "sram_bytes": bad}), bad
    # JSON Schema counts 2048.0 as an integer: so does validation.
    assert DeviceCreate.model_validate({**ok, "sram_bytes": 2048.0}).sram_bytes == 2048
    assert not model_accepts(DeviceCreate, {**ok, "name": "abc\n"})
    assert not document_accepts(DeviceCreate, {**ok, "name": "abc\n"})


def test_errors_name_every_field_in_the_house_words() -> None:
    with pytest.raises(ValidationError) as info:
        DeviceCreate.model_validate({"name": "", "sram_bytes": True, "tags": ["ok", 3],
                                     "x": 1, "ota_layout": None})
    errors = {e.field: e.message for e in field_errors(info.value, DeviceCreate)}
    assert set(errors) == {"name", "fleet", "sram_bytes", "tags[1]", "x", "ota_layout"}
    assert errors["fleet"] == "is required"
    assert errors["tags[1]"] == "must be a string, got integer"
    assert errors["x"].startswith("unknown field; known: name, fleet, mcu")
    with pytest.raises(ValidationError) as info:
        DeviceQuery.model_validate({"limit": "0"})
    (error,) = field_errors(info.value, DeviceQuery)
    assert (error.field, error.message) == ("limit", "0 is below the minimum 1")
    with pytest.raises(ValidationError) as info:
        DeviceBulkCreate.model_validate({"devices": [{"name": "a", "fleet": "f"}, 7]})
    errors_by_row = [(e.index, e.field) for e in field_errors(info.value, DeviceBulkCreate)]
    assert errors_by_row == [(1, "devices[1]")]


def test_query_strings_are_digits_only() -> None:
    assert DeviceQuery.model_validate({"limit": "20", "tag": ["a", "b"]}).limit == 20
    for bad in ("+20", " 20", "2_0", "20.0", "1e2", "-1", "٢٠"):
        with pytest.raises(ValidationError):
            DeviceQuery.model_validate({"limit": bad})
