"""Server-side tables (``meta.k8s.io/v1`` ``Table``) and the JSONPath subset printer columns use.

``kubectl get`` requests ``application/json;as=Table;v=v1;g=meta.k8s.io`` and prints whatever
columns the server returns. For custom resources the columns are Name plus the CRD's
``additionalPrinterColumns`` (Age alone when the CRD declares none), with cells converted by
column type as ``apiextensions-apiserver``'s table convertor does: ``date`` cells become ages
such as ``5m``, ``integer`` cells integers, and ``string`` cells the printed JSONPath result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dbsync.testing.kubeapi.errors import bad_request

MISSING = object()

DEFAULT_AGE_COLUMN: dict[str, Any] = {
    "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp",
}
NAME_COLUMN: dict[str, Any] = {
    "name": "Name", "type": "string", "format": "name", "priority": 0,
    "description": "Name must be unique within a namespace.",
}


@dataclass(frozen=True)
class Step:
    """One JSONPath step: a field name, an index, a wildcard or an equality filter."""

    kind: str  # "field", "index", "wildcard" or "filter"
    key: str = ""
    index: int = 0
    filter_path: tuple[str, ...] = ()
    filter_value: Any = None
    negate: bool = False


FILTER = re.compile(r"^\?\(@((?:\.[\w-]+)+)\s*(==|!=)\s*(.+)\)$")


def parse_jsonpath(expression: str) -> list[Step]:
    """Parse the JSONPath subset: ``.a.b``, ``[0]``, ``['k']``, ``[*]``, ``[?(@.x=="y")]``.

    Raises ``ApiError`` (400) for anything outside the subset, naming the expression.
    """
    text = expression.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    if text.startswith("$"):
        text = text[1:]
    steps: list[Step] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == ".":
            match = re.match(r"\.([\w-]+)", text[position:])
            if match is None:
                raise bad_request(f"unsupported JSONPath expression {expression!r}")
            steps.append(Step("field", key=match.group(1)))
            position += match.end()
        elif char == "[":
            end = find_closing_bracket(text, position, expression)
            steps.append(parse_bracket(text[position + 1:end].strip(), expression))
            position = end + 1
        else:
            raise bad_request(f"unsupported JSONPath expression {expression!r}")
    return steps


def find_closing_bracket(text: str, start: int, expression: str) -> int:
    depth = 0
    quote = ""
    for position in range(start, len(text)):
        char = text[position]
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return position
    raise bad_request(f"unclosed bracket in JSONPath expression {expression!r}")


def parse_bracket(inner: str, expression: str) -> Step:
    if inner == "*":
        return Step("wildcard")
    if re.fullmatch(r"-?\d+", inner):
        return Step("index", index=int(inner))
    if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
        return Step("field", key=inner[1:-1])
    match = FILTER.match(inner)
    if match is None:
        raise bad_request(f"unsupported JSONPath expression {expression!r}")
    literal = match.group(3).strip()
    value: Any
    if literal[0] in "'\"" and literal[-1] == literal[0]:
        value = literal[1:-1]
    else:
        try:
            value = json.loads(literal)
        except ValueError as error:
            raise bad_request(
                f"invalid literal {literal!r} in JSONPath expression {expression!r}") from error
    return Step(
        "filter",
        filter_path=tuple(match.group(1).strip(".").split(".")),
        filter_value=value,
        negate=match.group(2) == "!=",
    )


def evaluate_jsonpath(steps: list[Step], document: Any) -> list[Any]:
    """Return every value the steps select; missing keys select nothing, as with kubectl."""
    current = [document]
    for step in steps:
        selected: list[Any] = []
        for value in current:
            selected.extend(apply_step(step, value))
        current = selected
    return current


def apply_step(step: Step, value: Any) -> list[Any]:
    if step.kind == "field":
        if isinstance(value, dict) and step.key in value:
            return [value[step.key]]
        return []
    if step.kind == "index":
        if isinstance(value, list) and -len(value) <= step.index < len(value):
            return [value[step.index]]
        return []
    if step.kind == "wildcard":
        if isinstance(value, list):
            return list(value)
        if isinstance(value, dict):
            return list(value.values())
        return []
    if not isinstance(value, list):
        return []
    matches = []
    for item in value:
        found = lookup(item, step.filter_path)
        equal = found is not MISSING and found == step.filter_value
        if equal != step.negate:
            matches.append(item)
    return matches


def lookup(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def human_duration(seconds: float) -> str:
    """Format an age as ``k8s.io/apimachinery/pkg/util/duration.HumanDuration`` does."""
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    total = int(seconds)
    if total < 120:
        return f"{total}s"
    minutes = total // 60
    if minutes < 10:
        rest = total % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y{rest}d" if rest else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def parse_timestamp(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None


def age_cell(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    stamp = parse_timestamp(value)
    if stamp is None:
        return "<invalid>"
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return human_duration((datetime.now(UTC) - stamp).total_seconds())


def print_value(value: Any) -> str:
    """Print a JSONPath result as kubectl's JSONPath printer does for one value."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def typed_cell(column_type: str, value: Any) -> Any:
    """Convert a selected value to a cell by column type; a type mismatch gives an empty cell."""
    if value is None:
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if column_type == "string":
        return print_value(value)
    if column_type == "integer":
        return int(value) if is_number else None
    if column_type == "number":
        return float(value) if is_number else None
    if column_type == "boolean":
        return value if isinstance(value, bool) else None
    if column_type == "date":
        return age_cell(value)
    return None


@dataclass(frozen=True)
class TableColumns:
    """The column definitions of one resource and their parsed JSONPaths."""

    definitions: tuple[dict[str, Any], ...]
    paths: tuple[tuple[Step, ...], ...]

    @classmethod
    def from_printer_columns(cls, columns: list[dict[str, Any]]) -> TableColumns:
        columns = columns or [DEFAULT_AGE_COLUMN]
        definitions = [NAME_COLUMN]
        paths: list[tuple[Step, ...]] = []
        for column in columns:
            definitions.append({
                "name": column["name"],
                "type": column.get("type", "string"),
                "format": column.get("format", ""),
                "description": column.get("description")
                or f"Custom resource definition column (in JSONPath format): "
                f"{column['jsonPath']}",
                "priority": int(column.get("priority", 0)),
            })
            paths.append(tuple(parse_jsonpath(column["jsonPath"])))
        return cls(definitions=tuple(definitions), paths=tuple(paths))

    def cells(self, obj: dict[str, Any]) -> list[Any]:
        row: list[Any] = [obj.get("metadata", {}).get("name", "")]
        for definition, path in zip(self.definitions[1:], self.paths, strict=True):
            found = evaluate_jsonpath(list(path), obj)
            row.append(typed_cell(definition["type"], found[0]) if found else None)
        return row


def partial_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata", {}),
    }


def build_table(
    columns: TableColumns,
    objects: list[dict[str, Any]],
    *,
    resource_version: str,
    include_object: str,
    continue_token: str = "",
    no_headers: bool = False,
) -> dict[str, Any]:
    """Build a ``Table``; ``include_object`` is ``None``, ``Metadata`` or ``Object``."""
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": columns.cells(obj)}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = partial_metadata(obj)
        rows.append(row)
    metadata: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        metadata["continue"] = continue_token
    table: dict[str, Any] = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": [] if no_headers else list(columns.definitions),
        "rows": rows,
    }
    return table
