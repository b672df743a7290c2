"""A JSON-schema checker for the keywords the structured-output tests use (jsonschema is not a
dependency): type, properties, required, additionalProperties: false, enum, const, items,
minItems/maxItems, minLength/maxLength, minimum/maximum, anyOf, $ref to $defs."""

from __future__ import annotations

from typing import Any

_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return _resolve(node, root)


def check(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None,
          path: str = "$") -> None:
    """Raise AssertionError naming the path where ``value`` breaks ``schema``."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                check(value, option, root, path)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{path}: matches no anyOf option: {errors}")
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        assert any(_is_type(value, t) for t in names), f"{path}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != {schema['const']!r}"
    if isinstance(value, dict):
        _check_object(value, schema, root, path)
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0), f"{path}: too few items"
        assert len(value) <= schema.get("maxItems", len(value)), f"{path}: too many items"
        for i, item in enumerate(value):
            check(item, schema.get("items", {}), root, f"{path}[{i}]")
    if isinstance(value, str):
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)), \
            f"{path}: length {len(value)} outside the bounds"
    if _is_type(value, "number"):
        assert value >= schema.get("minimum", value), f"{path}: {value} < minimum"
        assert value <= schema.get("maximum", value), f"{path}: {value} > maximum"


def _check_object(value: dict[str, Any], schema: dict[str, Any], root: dict[str, Any],
                  path: str) -> None:
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        assert name in value, f"{path}: required property {name!r} missing"
    if schema.get("additionalProperties") is False:
        extra = set(value) - set(props)
        assert not extra, f"{path}: unexpected properties {sorted(extra)}"
    for name, item in value.items():
        if name in props:
            check(item, props[name], root, f"{path}.{name}")
