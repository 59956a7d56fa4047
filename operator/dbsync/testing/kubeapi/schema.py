"""Structural OpenAPI v3 schema handling for custom resources: pruning, defaulting, validation.

The order matches the real API server's decoding of a custom resource: unknown fields are
pruned, then defaults are applied, then the object is validated. Error details use the
wording of ``k8s.io/apiextensions-apiserver`` (v1.32), for example
``spec.replicas in body should be less than or equal to 10``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from dbsync.testing.kubeapi.errors import FieldError, format_field_value

Schema = dict[str, Any]

# Fields of ObjectMeta that clients may set; anything else under metadata is dropped, because
# the real server decodes metadata into a typed struct.
OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
})

# RFC 3339 as Go's time.Parse accepts it for the date-time format, loosely: an optional
# fraction and either Z or an offset.
DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


def json_type_name(value: Any) -> str:
    """Return the OpenAPI type name of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def matches_type(value: Any, expected: str) -> bool:
    """Return whether ``value`` has OpenAPI type ``expected``, counting integral floats."""
    actual = json_type_name(value)
    if expected == "number":
        return actual in ("integer", "number")
    if expected == "integer" and actual == "number":
        return float(value).is_integer()
    return actual == expected


def join_path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def preserves_unknown(schema: Schema) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields"))


# --- pruning -----------------------------------------------------------------------------


def prune(value: Any, schema: Schema, path: str = "", *, root: bool = False) -> list[str]:
    """Remove fields the schema does not declare, in place, and return their paths."""
    pruned: list[str] = []
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key in list(value):
            child_path = join_path(path, key)
            if root and key in ("apiVersion", "kind"):
                continue
            if root and key == "metadata":
                pruned.extend(prune_metadata(value[key]))
                continue
            if key in properties:
                pruned.extend(prune(value[key], properties[key], child_path))
            elif isinstance(additional, dict):
                pruned.extend(prune(value[key], additional, f"{path}[{key}]"))
            elif additional is True or preserves_unknown(schema):
                continue
            else:
                del value[key]
                pruned.append(child_path)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            pruned.extend(prune(item, schema["items"], f"{path}[{index}]"))
    return pruned


def prune_metadata(metadata: Any) -> list[str]:
    if not isinstance(metadata, dict):
        return []
    unknown = [key for key in metadata if key not in OBJECT_META_FIELDS]
    for key in unknown:
        del metadata[key]
    return [f"metadata.{key}" for key in unknown]


# --- defaulting --------------------------------------------------------------------------


def apply_defaults(value: Any, schema: Schema) -> None:
    """Fill in ``default`` values of absent fields (and of null non-nullable ones), in place."""
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties", {})
        for key, child in properties.items():
            # Why: a null in a non-nullable field is treated as absent when a default exists.
            absent = key not in value or (value[key] is None and not child.get("nullable"))
            if absent and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                apply_defaults(value[key], child)
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for key, item in value.items():
                if key not in properties:
                    apply_defaults(item, additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])


# --- validation --------------------------------------------------------------------------


@dataclass
class Validator:
    """Collects every violation of one schema, as the real server reports all of them."""

    errors: list[FieldError] = field(default_factory=list)

    def invalid(self, path: str, value: Any, detail: str) -> None:
        self.errors.append(
            FieldError("FieldValueInvalid", path, f"Invalid value: {format_field_value(value)}: "
                       f"{detail}")
        )

    def validate(self, value: Any, schema: Schema, path: str) -> None:
        if value is None:
            if schema.get("nullable") or (preserves_unknown(schema) and "type" not in schema):
                return
            if "type" in schema:
                self.errors.append(FieldError(
                    "FieldValueTypeInvalid", path,
                    f'Invalid value: "null": {path} in body must be of type '
                    f'{schema["type"]}: "null"'))
            return

        if schema.get("x-kubernetes-int-or-string"):
            if not (matches_type(value, "integer") or isinstance(value, str)):
                actual = json_type_name(value)
                self.errors.append(FieldError(
                    "FieldValueTypeInvalid", path,
                    f'Invalid value: "{actual}": {path} in body must be of type '
                    f'integer,string: "{actual}"'))
                return
        elif "type" in schema and not matches_type(value, schema["type"]):
            actual = json_type_name(value)
            self.errors.append(FieldError(
                "FieldValueTypeInvalid", path,
                f'Invalid value: "{actual}": {path} in body must be of type '
                f'{schema["type"]}: "{actual}"'))
            return

        self.validate_enum(value, schema, path)
        if isinstance(value, str):
            self.validate_string(value, schema, path)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self.validate_number(value, schema, path)
        elif isinstance(value, list):
            self.validate_array(value, schema, path)
        elif isinstance(value, dict):
            self.validate_object(value, schema, path)
        self.validate_combinators(value, schema, path)

    def validate_enum(self, value: Any, schema: Schema, path: str) -> None:
        allowed = schema.get("enum")
        if allowed is None or value in allowed:
            return
        supported = ", ".join(format_field_value(item) for item in allowed)
        self.errors.append(FieldError(
            "FieldValueNotSupported", path,
            f"Unsupported value: {format_field_value(value)}: supported values: {supported}"))

    def validate_string(self, value: str, schema: Schema, path: str) -> None:
        max_length = schema.get("maxLength")
        if max_length is not None and len(value) > max_length:
            self.errors.append(FieldError(
                "FieldValueTooLong", path, f"Too long: may not be more than {max_length} bytes"))
        min_length = schema.get("minLength")
        if min_length is not None and len(value) < min_length:
            self.invalid(path, value, f"{path} in body should be at least {min_length} chars long")
        pattern = schema.get("pattern")
        if pattern is not None and re.search(pattern, value) is None:
            self.invalid(path, value, f"{path} in body should match '{pattern}'")
        if schema.get("format") == "date-time" and DATE_TIME.match(value) is None:
            self.invalid(path, value, f'{path} in body must be of type date-time: "{value}"')

    def validate_number(self, value: float, schema: Schema, path: str) -> None:
        maximum = schema.get("maximum")
        if maximum is not None:
            if schema.get("exclusiveMaximum") and value >= maximum:
                self.invalid(path, value, f"{path} in body should be less than {maximum}")
            elif value > maximum:
                self.invalid(
                    path, value, f"{path} in body should be less than or equal to {maximum}")
        minimum = schema.get("minimum")
        if minimum is not None:
            if schema.get("exclusiveMinimum") and value <= minimum:
                self.invalid(path, value, f"{path} in body should be greater than {minimum}")
            elif value < minimum:
                self.invalid(
                    path, value, f"{path} in body should be greater than or equal to {minimum}")
        multiple = schema.get("multipleOf")
        if multiple and (value / multiple) != int(value / multiple):
            self.invalid(path, value, f"{path} in body should be a multiple of {multiple}")

    def validate_array(self, value: list[Any], schema: Schema, path: str) -> None:
        max_items = schema.get("maxItems")
        if max_items is not None and len(value) > max_items:
            self.errors.append(FieldError(
                "FieldValueTooMany", path,
                f"Too many: {len(value)}: must have at most {max_items} items"))
        min_items = schema.get("minItems")
        if min_items is not None and len(value) < min_items:
            self.invalid(path, value, f"{path} in body should have at least {min_items} items")
        unique = schema.get("uniqueItems") or schema.get("x-kubernetes-list-type") == "set"
        if unique:
            seen: list[Any] = []
            for index, item in enumerate(value):
                if item in seen:
                    self.errors.append(FieldError(
                        "FieldValueDuplicate", f"{path}[{index}]",
                        f"Duplicate value: {format_field_value(item)}"))
                seen.append(item)
        items = schema.get("items")
        if isinstance(items, dict):
            for index, item in enumerate(value):
                self.validate(item, items, f"{path}[{index}]")

    def validate_object(self, value: dict[str, Any], schema: Schema, path: str) -> None:
        for name in schema.get("required", []):
            if name not in value:
                self.errors.append(
                    FieldError("FieldValueRequired", join_path(path, name), "Required value"))
        max_properties = schema.get("maxProperties")
        if max_properties is not None and len(value) > max_properties:
            self.errors.append(FieldError(
                "FieldValueTooMany", path,
                f"Too many: {len(value)}: must have at most {max_properties} items"))
        min_properties = schema.get("minProperties")
        if min_properties is not None and len(value) < min_properties:
            self.invalid(
                path, value, f"{path} in body should have at least {min_properties} properties")
        properties: dict[str, Schema] = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                self.validate(item, properties[key], join_path(path, key))
            elif isinstance(additional, dict):
                self.validate(item, additional, f"{path}[{key}]")

    def validate_combinators(self, value: Any, schema: Schema, path: str) -> None:
        # Why: in structural schemas these only add value checks; they never declare fields.
        for sub in schema.get("allOf", []):
            self.validate(value, sub, path)
        if "anyOf" in schema and not any(passes(value, sub, path) for sub in schema["anyOf"]):
            self.invalid(path, value, f"{path} in body must match at least one schema in anyOf")
        if "oneOf" in schema:
            matched = sum(1 for sub in schema["oneOf"] if passes(value, sub, path))
            if matched != 1:
                self.invalid(path, value, f"{path} in body must validate one and only one "
                             "schema (oneOf)")
        if "not" in schema and passes(value, schema["not"], path):
            self.invalid(path, value, f"{path} in body must not validate the schema (not)")


def passes(value: Any, schema: Schema, path: str) -> bool:
    validator = Validator()
    validator.validate(value, schema, path)
    return not validator.errors


def validate(obj: dict[str, Any], schema: Schema) -> list[FieldError]:
    """Validate a whole custom resource except ``metadata``, which the store checks."""
    validator = Validator()
    properties: dict[str, Schema] = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in obj:
            validator.errors.append(FieldError("FieldValueRequired", name, "Required value"))
    for key, value in obj.items():
        if key in ("apiVersion", "kind", "metadata"):
            continue
        if key in properties:
            validator.validate(value, properties[key], key)
        elif isinstance(schema.get("additionalProperties"), dict):
            validator.validate(value, schema["additionalProperties"], key)
    # NOTE: x-kubernetes-validations (CEL rules) are not evaluated by this emulator.
    return validator.errors


def prepare(obj: dict[str, Any], schema: Schema | None) -> tuple[list[str], list[FieldError]]:
    """Prune, default and validate ``obj`` in place, returning pruned paths and errors."""
    if schema is None:
        return prune_metadata(obj.get("metadata")), []
    pruned = prune(obj, schema, root=True)
    apply_defaults(obj, {**schema, "properties": {
        key: value for key, value in schema.get("properties", {}).items() if key != "metadata"}})
    return pruned, validate(obj, schema)
