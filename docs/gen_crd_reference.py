"""Generate docs/crd-reference.md from the committed CustomResourceDefinition.

The reference is rendered from ``crds/databasesync.yaml`` alone, so it documents what the API
server enforces: every field with its type, default, limits and description. Run it after
``dbsync crd`` changes the CRD:

    python docs/gen_crd_reference.py            # rewrite docs/crd-reference.md
    python docs/gen_crd_reference.py --check    # exit 1 if the committed file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = ROOT / "crds" / "databasesync.yaml"
REFERENCE_PATH = ROOT / "docs" / "crd-reference.md"


@dataclass(frozen=True)
class FieldRow:
    """One documented field: its path below the resource root and its schema."""

    path: str
    schema: Mapping[str, Any]
    required: bool


def iter_fields(schema: Mapping[str, Any], path: str) -> Iterator[FieldRow]:
    """Yield every field below ``schema`` depth first, in the order the schema declares them.

    Array items appear as ``path[]`` and map values as ``path.<key>``.
    """
    required = set(schema.get("required") or [])
    for name, child in (schema.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        yield FieldRow(child_path, child, name in required)
        yield from iter_nested(child, child_path)


def iter_nested(schema: Mapping[str, Any], path: str) -> Iterator[FieldRow]:
    if "properties" in schema:
        yield from iter_fields(schema, path)
    items = schema.get("items")
    if isinstance(items, Mapping) and ("properties" in items or "items" in items):
        yield from iter_nested(items, f"{path}[]")
    values = schema.get("additionalProperties")
    if isinstance(values, Mapping) and ("properties" in values or "items" in values):
        yield from iter_nested(values, f"{path}.<key>")


def describe_type(schema: Mapping[str, Any]) -> str:
    """Return a field's type as a reader writes it: ``[]string``, ``map[string]integer``."""
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return "[]" + describe_type(schema.get("items") or {})
    values = schema.get("additionalProperties")
    if kind == "object" and isinstance(values, Mapping):
        return "map[string]" + describe_type(values)
    if "format" in schema:
        return f"{kind} ({schema['format']})"
    return kind


def describe_constraints(schema: Mapping[str, Any]) -> list[str]:
    """Return the schema's limits as short phrases, for example ``1 to 253 characters``."""
    phrases: list[str] = []
    if "enum" in schema:
        phrases.append("one of " + ", ".join(f"`{value}`" for value in schema["enum"]))

    lower = schema.get("minimum")
    upper = schema.get("maximum")
    exclusive = schema.get("exclusiveMinimum") or schema.get("exclusiveMaximum")
    if lower is not None and upper is not None and not exclusive:
        phrases.append(f"{lower} to {upper}")
    else:
        if lower is not None:
            phrases.append(f"{'>' if schema.get('exclusiveMinimum') else '≥'} {lower}")
        if upper is not None:
            phrases.append(f"{'<' if schema.get('exclusiveMaximum') else '≤'} {upper}")

    for unit, low_key, high_key in (
        ("characters", "minLength", "maxLength"),
        ("items", "minItems", "maxItems"),
    ):
        low, high = schema.get(low_key), schema.get(high_key)
        if low is not None and high is not None:
            phrases.append(f"{low} to {high} {unit}")
        elif high is not None:
            phrases.append(f"at most {high} {unit}")
        elif low is not None:
            phrases.append(f"at least {low} {unit}")

    if "pattern" in schema:
        phrases.append(f"matches `{schema['pattern']}`")
    for rule in schema.get("x-kubernetes-validations") or []:
        phrases.append(f"rule `{rule['rule']}`" + (f": {rule['message']}" if "message" in rule
                                                    else ""))
    return phrases


def table_cell(text: str) -> str:
    """Escape text for one Markdown table cell: pipes and line breaks would split the row."""
    return text.replace("|", "\\|").replace("\n", " ").strip()


def describe_default(schema: Mapping[str, Any]) -> str:
    """Return the default as it would be written in YAML, or an empty string without one."""
    if "default" not in schema:
        return ""
    default = schema["default"]
    if isinstance(default, str):
        return f"`{default}`"
    return f"`{json.dumps(default)}`"


def render_fields(rows: list[FieldRow]) -> list[str]:
    lines = [
        "| Field | Type | Required | Default | Constraints | Description |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"`{row.path}`",
            describe_type(row.schema),
            "yes" if row.required else "",
            describe_default(row.schema),
            "; ".join(describe_constraints(row.schema)),
            str(row.schema.get("description", "")),
        ]
        lines.append("| " + " | ".join(table_cell(cell) for cell in cells) + " |")
    return lines


def render_printer_columns(version: Mapping[str, Any]) -> list[str]:
    columns = version.get("additionalPrinterColumns") or []
    if not columns:
        return []
    lines = [
        "### Columns of `kubectl get`",
        "",
        "Columns with priority 1 appear only with `-o wide`.",
        "",
        "| Column | Type | JSONPath | Priority | Description |",
        "|---|---|---|---|---|",
    ]
    for column in columns:
        cells = [
            column["name"],
            column["type"],
            f"`{column['jsonPath']}`",
            str(column.get("priority", 0)),
            str(column.get("description", "")),
        ]
        lines.append("| " + " | ".join(table_cell(cell) for cell in cells) + " |")
    lines.append("")
    return lines


def render_reference(crd: Mapping[str, Any], *, source: str = "crds/databasesync.yaml") -> str:
    """Return the Markdown reference of every version of ``crd``."""
    spec = crd["spec"]
    names = spec["names"]
    group = spec["group"]
    lines = [
        f"# {names['kind']} reference",
        "",
        f"<!-- Generated by docs/gen_crd_reference.py from {source}; do not edit by hand. -->",
        "",
        "| | |",
        "|---|---|",
        f"| API group | `{group}` |",
        f"| Kind | `{names['kind']}` |",
        f"| Scope | {spec['scope']} |",
        f"| Plural | `{names['plural']}` |",
        f"| Singular | `{names.get('singular', names['kind'].lower())}` |",
    ]
    if names.get("shortNames"):
        lines.append(f"| Short names | {', '.join(f'`{name}`' for name in names['shortNames'])} |")
    if names.get("categories"):
        lines.append(f"| Categories | {', '.join(f'`{name}`' for name in names['categories'])} |")
    lines.append("")

    for version in spec["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        flags = [flag for flag in ("served", "storage") if version.get(flag)]
        subresources = sorted(version.get("subresources") or {})
        lines += [
            f"## {group}/{version['name']}",
            "",
            f"Served: {'yes' if 'served' in flags else 'no'}. "
            f"Storage version: {'yes' if 'storage' in flags else 'no'}. "
            f"Subresources: {', '.join(subresources) if subresources else 'none'}.",
            "",
        ]
        if schema.get("description"):
            lines += [table_cell(str(schema["description"])), ""]
        lines += render_printer_columns(version)

        properties = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        for top in ("spec", "status"):
            if top not in properties:
                continue
            top_schema = properties[top]
            lines += [f"### `{top}`", ""]
            if top in required:
                lines += [f"`{top}` is required.", ""]
            if top_schema.get("description"):
                lines += [table_cell(str(top_schema["description"])), ""]
            lines += [
                "A field marked required must be set whenever the object that contains it is set.",
                "",
            ]
            lines += render_fields(list(iter_fields(top_schema, top)))
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference, or with ``--check`` report whether the committed one is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="compare with docs/crd-reference.md instead of writing it")
    args = parser.parse_args(argv)

    crd = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    rendered = render_reference(crd)

    if args.check:
        committed = REFERENCE_PATH.read_text(encoding="utf-8") if REFERENCE_PATH.exists() else ""
        if committed != rendered:
            print(f"{REFERENCE_PATH.relative_to(ROOT)} is out of date: run "
                  "python docs/gen_crd_reference.py", file=sys.stderr)
            return 1
        return 0

    REFERENCE_PATH.write_text(rendered, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
