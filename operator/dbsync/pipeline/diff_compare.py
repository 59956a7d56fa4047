"""Comparison of two catalog snapshots: matching, ignore rules, hazards and rendering.

Objects are matched by identity (kind plus schema and name, or signature for functions), so a
renamed object reads as one removed and one added. Each difference rates what it would take to
bring the target to the source: ``safe``, ``warning`` (locks or rewrites a table, or may fail on
existing data) or ``destructive`` (drops or narrows something that holds data).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any

from dbsync.pipeline.diff_catalog import (
    OBJECT_KINDS,
    PLURAL_KIND_NAMES,
    CatalogObject,
    PropertyValue,
    Schema,
)
from dbsync.pipeline.errors import ConfigurationError


class Hazard(StrEnum):
    """Risk of changing the target so that it matches the source."""

    SAFE = "safe"
    WARNING = "warning"
    DESTRUCTIVE = "destructive"


class Severity(StrEnum):
    """How much a difference matters to people reading the report."""

    LOW = "low"
    NORMAL = "normal"


# Pseudo-kind accepted by ignore_kinds: drops the column order findings of tables.
COLUMN_ORDER = "column_order"
IGNORABLE_KINDS: tuple[str, ...] = (*OBJECT_KINDS, COLUMN_ORDER)

# Values of the "exists" property, which reports an object present on one side only.
EXISTS_PROPERTY = "exists"
PRESENT = "present"
ABSENT = "absent"

# dbsync's own objects: the audit table and view, and anything named dbsync_* (its Alembic
# version table among them). An application's alembic_version is compared like any table.
DBSYNC_OBJECT_NAMES = frozenset({"sync_audit_logs", "sync_audit_operations"})
DBSYNC_NAME_PREFIX = "dbsync_"

# Kinds that can own other objects (columns, indexes, constraints, triggers, policies).
_CONTAINER_KINDS = ("table", "view", "materialized_view")

# Properties compared only when the gating property has a value on both sides: an identity
# column's sequence options are part of the identity difference when one side has none.
_GATED_PROPERTIES: Mapping[tuple[str, str], str] = MappingProxyType({
    ("column", "identity_sequence"): "identity",
})

# Low-severity properties: comments, and column order, which matters only to SELECT * and to
# INSERT without a column list.
_LOW_SEVERITY_PROPERTIES = frozenset({"comment", COLUMN_ORDER})


@dataclass(frozen=True, kw_only=True)
class DiffOptions:
    """Ignore rules of a diff and the connection timeout of its two sessions."""

    ignore_schemas: tuple[str, ...] = ()
    ignore_patterns: tuple[str, ...] = ()  # globs on the qualified name
    ignore_kinds: tuple[str, ...] = ()
    include_dbsync_objects: bool = False
    connect_timeout_seconds: int = 10

    def __post_init__(self) -> None:
        unknown = sorted(set(self.ignore_kinds) - set(IGNORABLE_KINDS))
        if unknown:
            raise ConfigurationError(
                f"unknown object kind to ignore: {', '.join(unknown)}; use one of "
                f"{', '.join(IGNORABLE_KINDS)}")
        if self.connect_timeout_seconds <= 0:
            raise ConfigurationError(
                f"connect_timeout_seconds must be positive, got {self.connect_timeout_seconds}")


DEFAULT_OPTIONS = DiffOptions()


@dataclass(frozen=True)
class Difference:
    """One property of one object that differs between source and target."""

    kind: str
    name: str
    property: str
    source: str | None
    target: str | None
    hazard: Hazard
    severity: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "property": self.property,
            "source": self.source,
            "target": self.target,
            "hazard": str(self.hazard),
            "severity": self.severity,
        }

    def render_text(self) -> str:
        if self.property == EXISTS_PROPERTY:
            where = "missing in target" if self.target == ABSENT else "only in target"
            return f"{self.kind} {self.name}: {where}"
        return (f"{self.kind} {self.name} {self.property}: source {_one_line(self.source)}, "
                f"target {_one_line(self.target)}")


@dataclass(frozen=True)
class DiffResult:
    """Outcome of a schema diff: object counts on each side and every difference found."""

    summary: Mapping[str, Mapping[str, int]]
    differences: tuple[Difference, ...]

    @property
    def in_sync(self) -> bool:
        return not self.differences

    def counts_by_kind(self) -> dict[str, int]:
        """Count the differences per object kind."""
        counts: dict[str, int] = {}
        for difference in self.differences:
            counts[difference.kind] = counts.get(difference.kind, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": {kind: dict(sides) for kind, sides in self.summary.items()},
            "differences": [difference.to_dict() for difference in self.differences],
        }

    def render_text(self) -> str:
        """Render the counts table and one line per difference, for people."""
        lines: list[str] = []
        if self.in_sync:
            lines.append("Schema diff: no differences")
        else:
            by_hazard = dict.fromkeys(Hazard, 0)
            for difference in self.differences:
                by_hazard[difference.hazard] += 1
            tally = ", ".join(f"{count} {hazard}" for hazard, count in by_hazard.items())
            lines.append(f"Schema diff: {len(self.differences)} differences ({tally})")

        lines.append("")
        lines.append(f"  {'objects':<20} {'source':>8} {'target':>8}")
        for kind, sides in self.summary.items():
            # Tables and columns are always shown, other kinds only when present.
            if kind in ("tables", "columns") or sides.get("source") or sides.get("target"):
                lines.append(
                    f"  {kind:<20} {sides.get('source', 0):>8} {sides.get('target', 0):>8}")

        if self.differences:
            lines.append("")
            width = max(len(str(hazard)) for hazard in Hazard) + 2
            for difference in self.differences:
                label = f"[{difference.hazard}]"
                lines.append(f"  {label:<{width}} {difference.render_text()}")
        return "\n".join(lines)


def _one_line(value: str | None) -> str:
    if value is None:
        return "(none)"
    return " ".join(value.split())


# --- Ignore rules --------------------------------------------------------------------------------

def _object_names(item: CatalogObject) -> Iterable[str]:
    """Yield the names a glob may match: qualified raw name, quoted name and owner's name."""
    if item.kind in ("function", "procedure"):
        yield f"{item.key[0]}.{item.key[1]}"
    else:
        yield ".".join(item.key)
    yield item.name
    if item.owner is not None:
        yield ".".join(item.owner)


def visible_objects(schema: Schema, options: DiffOptions
                    ) -> dict[str, dict[tuple[str, ...], CatalogObject]]:
    """Return the snapshot's objects by kind, without those the ignore rules leave out.

    An ignored table or view takes its columns, constraints, indexes, triggers and policies
    with it. The dbsync_* name rule applies to objects that stand alone, so a user table's
    column named dbsync_something is still compared.
    """
    ignored_schemas = frozenset(options.ignore_schemas)
    patterns = options.ignore_patterns

    def is_ignored(kind: str, key: tuple[str, ...], item: CatalogObject) -> bool:
        # Extensions are database-wide, so their key is a name, not a schema.
        if kind != "extension" and key[0] in ignored_schemas:
            return True
        if item.owner is None and not options.include_dbsync_objects:
            own_name = key[1] if kind in ("function", "procedure") else key[-1]
            if own_name.startswith(DBSYNC_NAME_PREFIX) or own_name in DBSYNC_OBJECT_NAMES:
                return True
        return bool(patterns) and any(
            fnmatchcase(name, pattern) for pattern in patterns for name in _object_names(item))

    # Tables and views are filtered first, so that owned objects need one set lookup each.
    ignored_owners: set[tuple[str, ...]] = set()
    for kind in _CONTAINER_KINDS:
        for key, item in schema.of_kind(kind).items():
            if is_ignored(kind, key, item):
                ignored_owners.add(key)

    visible: dict[str, dict[tuple[str, ...], CatalogObject]] = {}
    for kind in OBJECT_KINDS:
        items: dict[tuple[str, ...], CatalogObject] = {}
        visible[kind] = items
        if kind in options.ignore_kinds:
            continue
        for key, item in schema.of_kind(kind).items():
            if kind in _CONTAINER_KINDS:
                hidden = key in ignored_owners
            else:
                hidden = (item.owner is not None and item.owner in ignored_owners) or (
                    is_ignored(kind, key, item))
            if not hidden:
                items[key] = item
    return visible


# --- Hazards -------------------------------------------------------------------------------------

HazardRule = Hazard | Callable[[PropertyValue, PropertyValue], Hazard]

_INTEGER_WIDTHS = {"smallint": 2, "integer": 4, "bigint": 8}
_TYPE_WITH_MODIFIER = re.compile(r"^(?P<base>[a-z ]+?)(?:\((?P<modifier>[0-9, ]+)\))?$")
_LITERAL = re.compile(r"'((?:[^']|'')*)'")


def _split_array(type_name: str) -> tuple[str, int]:
    dimensions = 0
    while type_name.endswith("[]"):
        type_name = type_name[:-2]
        dimensions += 1
    return type_name, dimensions


def _type_change_hazard(source: PropertyValue, target: PropertyValue) -> Hazard:
    """Rate ``ALTER COLUMN ... TYPE`` from the target's type to the source's.

    Safe: lengthening or dropping a varchar limit, raising a numeric precision at the same
    scale (PostgreSQL rewrites nothing for these). Warning: widening an integer, integer to
    numeric, timestamp to timestamptz (a rewrite, but every value fits). Destructive: anything
    else, because values may be cut or fail to convert.
    """
    if source is None or target is None:
        return Hazard.DESTRUCTIVE
    source_base, source_dimensions = _split_array(source)
    target_base, target_dimensions = _split_array(target)
    if source_base == target_base:
        # Only the declared array dimensions differ, which PostgreSQL does not enforce.
        return Hazard.SAFE
    if source_dimensions != target_dimensions:
        return Hazard.DESTRUCTIVE

    source_match = _TYPE_WITH_MODIFIER.match(source_base)
    target_match = _TYPE_WITH_MODIFIER.match(target_base)
    if source_match is None or target_match is None:
        return Hazard.DESTRUCTIVE
    source_name, source_modifier = source_match["base"], source_match["modifier"]
    target_name, target_modifier = target_match["base"], target_match["modifier"]

    if target_name == "character varying" and source_name in ("character varying", "text"):
        if source_modifier is None:
            return Hazard.SAFE
        if target_modifier is not None and int(source_modifier) >= int(target_modifier):
            return Hazard.SAFE
        return Hazard.DESTRUCTIVE
    if target_name == "numeric" and source_name == "numeric":
        if source_modifier is None:
            return Hazard.SAFE
        if target_modifier is None:
            return Hazard.DESTRUCTIVE
        source_precision, _, source_scale = source_modifier.partition(",")
        target_precision, _, target_scale = target_modifier.partition(",")
        if source_scale == target_scale and int(source_precision) >= int(target_precision):
            return Hazard.SAFE
        return Hazard.DESTRUCTIVE
    if target_name in _INTEGER_WIDTHS:
        if source_name in _INTEGER_WIDTHS and (
                _INTEGER_WIDTHS[source_name] > _INTEGER_WIDTHS[target_name]):
            return Hazard.WARNING
        if source_name == "numeric" and source_modifier is None:
            return Hazard.WARNING
    if target_name == "timestamp without time zone" and (
            source_name == "timestamp with time zone"):
        return Hazard.WARNING
    if target_name == "real" and source_name == "double precision":
        return Hazard.WARNING
    return Hazard.DESTRUCTIVE


def _enum_labels_hazard(source: PropertyValue, target: PropertyValue) -> Hazard:
    """Safe when the source only adds labels (ALTER TYPE ... ADD VALUE), else destructive."""
    source_labels = _LITERAL.findall(source or "")
    target_labels = _LITERAL.findall(target or "")
    # Labels cannot be removed or reordered in place: the type must be re-created and every
    # column using it converted.
    target_set = set(target_labels)
    shared_in_source_order = [label for label in source_labels if label in target_set]
    if target_set <= set(source_labels) and shared_in_source_order == target_labels:
        return Hazard.SAFE
    return Hazard.DESTRUCTIVE


def _tightening(source: PropertyValue, target: PropertyValue) -> Hazard:
    """Warning when the source turns on a check the target lacks (yes vs no), else safe."""
    return Hazard.WARNING if source == "yes" and target != "yes" else Hazard.SAFE


def _identity_hazard(source: PropertyValue, target: PropertyValue) -> Hazard:
    # Switching between ALWAYS and BY DEFAULT is a catalog change. Adding or removing an
    # identity takes an ACCESS EXCLUSIVE lock and changes how inserts get values.
    return Hazard.SAFE if source is not None and target is not None else Hazard.WARNING


_PROPERTY_HAZARDS: Mapping[tuple[str, str], HazardRule] = MappingProxyType({
    ("schema", "comment"): Hazard.SAFE,
    ("extension", "version"): Hazard.WARNING,
    ("extension", "schema"): Hazard.WARNING,
    ("enum", "labels"): _enum_labels_hazard,
    ("domain", "base_type"): _type_change_hazard,
    ("domain", "default"): Hazard.SAFE,
    ("domain", "not_null"): _tightening,
    ("domain", "collation"): Hazard.WARNING,
    ("domain", "constraints"): Hazard.WARNING,
    ("sequence", "type"): Hazard.WARNING,
    ("sequence", "start"): Hazard.SAFE,
    ("sequence", "increment"): Hazard.SAFE,
    ("sequence", "minimum"): Hazard.WARNING,
    ("sequence", "maximum"): Hazard.WARNING,
    ("sequence", "cache"): Hazard.SAFE,
    ("sequence", "cycle"): Hazard.SAFE,
    ("sequence", "owned_by"): Hazard.SAFE,
    ("table", "kind"): Hazard.DESTRUCTIVE,
    ("table", "partition"): Hazard.WARNING,
    ("table", "inherits"): Hazard.WARNING,
    ("table", "persistence"): Hazard.WARNING,
    ("table", "row_level_security"): Hazard.SAFE,
    ("table", "force_row_level_security"): Hazard.SAFE,
    ("table", "storage_parameters"): Hazard.SAFE,
    ("table", "comment"): Hazard.SAFE,
    ("table", COLUMN_ORDER): Hazard.WARNING,
    ("column", "type"): _type_change_hazard,
    ("column", "collation"): Hazard.WARNING,
    ("column", "not_null"): _tightening,
    ("column", "default"): Hazard.SAFE,
    ("column", "identity"): _identity_hazard,
    ("column", "identity_sequence"): Hazard.SAFE,
    ("column", "generated"): Hazard.WARNING,
    ("column", "comment"): Hazard.SAFE,
    ("constraint", "deferrable"): Hazard.SAFE,
    ("constraint", "initially_deferred"): Hazard.SAFE,
    ("constraint", "validated"): _tightening,
    ("constraint", "enforced"): _tightening,
    ("index", "parent_index"): Hazard.SAFE,
    ("view", "definition"): Hazard.SAFE,
    ("view", "options"): Hazard.SAFE,
    ("view", "comment"): Hazard.SAFE,
    ("materialized_view", "definition"): Hazard.WARNING,
    ("materialized_view", "options"): Hazard.SAFE,
    ("materialized_view", "comment"): Hazard.SAFE,
})

# Kinds whose every property change is a catalog-only change (CREATE OR REPLACE, ALTER).
_SAFE_PROPERTY_KINDS = frozenset({"function", "procedure", "trigger", "policy"})

# Dropping these loses stored data or everything that depends on them.
_DESTRUCTIVE_WHEN_EXTRA = frozenset({
    "schema", "extension", "enum", "domain", "sequence", "table", "column", "materialized_view"})


def _property_hazard(kind: str, name: str, source: PropertyValue,
                     target: PropertyValue) -> Hazard:
    rule = _PROPERTY_HAZARDS.get((kind, name))
    if rule is None:
        # Other constraint and index changes mean drop and re-create, which locks the table
        # and validates or rebuilds over existing rows.
        return Hazard.SAFE if kind in _SAFE_PROPERTY_KINDS else Hazard.WARNING
    if isinstance(rule, Hazard):
        return rule
    return rule(source, target)


def _missing_hazard(item: CatalogObject) -> Hazard:
    """Rate creating ``item`` in the target."""
    properties = item.property_map()
    if item.kind == "column":
        # A NOT NULL column without a default cannot be added to a table that has rows, and
        # identity or stored generated columns rewrite the table.
        needs_value = properties["not_null"] == "yes" and properties["default"] is None
        rewrites = properties["identity"] is not None or (
            (properties["generated"] or "").startswith("STORED"))
        return Hazard.WARNING if needs_value or rewrites else Hazard.SAFE
    if item.kind == "constraint":
        # NOT VALID skips the scan over existing rows.
        return Hazard.WARNING if properties["validated"] == "yes" else Hazard.SAFE
    if item.kind in ("index", "materialized_view"):
        return Hazard.WARNING
    return Hazard.SAFE


def _extra_hazard(item: CatalogObject) -> Hazard:
    """Rate dropping ``item`` from the target."""
    return Hazard.DESTRUCTIVE if item.kind in _DESTRUCTIVE_WHEN_EXTRA else Hazard.SAFE


def _difference(kind: str, name: str, property_name: str, source: PropertyValue,
                target: PropertyValue, hazard: Hazard) -> Difference:
    severity = Severity.LOW if property_name in _LOW_SEVERITY_PROPERTIES else Severity.NORMAL
    return Difference(kind=kind, name=name, property=property_name, source=source,
                      target=target, hazard=hazard, severity=str(severity))


# --- Comparison ----------------------------------------------------------------------------------

ObjectsByKind = Mapping[str, Mapping[tuple[str, ...], CatalogObject]]


def _owner_on_both_sides(item: CatalogObject, this_side: ObjectsByKind,
                         other_side: ObjectsByKind) -> bool:
    """Tell whether ``item``'s table or view exists, as the same kind, on both sides."""
    if item.owner is None:
        return True
    return any(item.owner in this_side[kind] and item.owner in other_side[kind]
               for kind in _CONTAINER_KINDS)


def _partitions(objects: ObjectsByKind) -> set[tuple[str, ...]]:
    return {key for key, table in objects["table"].items()
            if table.property_map().get("partition") is not None}


def _compare_kind(kind: str, source: ObjectsByKind, target: ObjectsByKind,
                  partitions_on_both_sides: set[tuple[str, ...]]) -> list[Difference]:
    differences: list[Difference] = []
    source_items = source[kind]
    target_items = target[kind]

    # Most objects are equal, so keys are sorted only once they are known to differ.
    changed_keys = [key for key, item in source_items.items()
                    if (other := target_items.get(key)) is None or other.values != item.values
                    or other.property_names != item.property_names]
    changed_keys.extend(key for key in target_items if key not in source_items)

    for key in sorted(changed_keys):
        source_item = source_items.get(key)
        target_item = target_items.get(key)
        # PostgreSQL forces a partition's columns to match its parent's, so comparing them
        # again would repeat each parent difference once per partition.
        if kind == "column" and key[:2] in partitions_on_both_sides:
            continue

        if target_item is None:
            assert source_item is not None
            # An object whose whole table is missing is covered by the table's difference.
            if _owner_on_both_sides(source_item, source, target):
                differences.append(_difference(kind, source_item.name, EXISTS_PROPERTY,
                                               PRESENT, ABSENT, _missing_hazard(source_item)))
            continue

        if source_item is None:
            if _owner_on_both_sides(target_item, target, source):
                differences.append(_difference(kind, target_item.name, EXISTS_PROPERTY,
                                               ABSENT, PRESENT, _extra_hazard(target_item)))
            continue

        differences.extend(_compare_properties(kind, source_item, target_item))
    return differences


def _compare_properties(kind: str, source_item: CatalogObject,
                        target_item: CatalogObject) -> list[Difference]:
    differences: list[Difference] = []
    source_properties = source_item.property_map()
    target_properties = target_item.property_map()
    for property_name, source_value in source_item.properties:
        target_value = target_properties.get(property_name)
        if source_value == target_value:
            continue
        gate = _GATED_PROPERTIES.get((kind, property_name))
        if gate is not None and (
                source_properties.get(gate) is None or target_properties.get(gate) is None):
            continue
        differences.append(_difference(
            kind, source_item.name, property_name, source_value, target_value,
            _property_hazard(kind, property_name, source_value, target_value)))
    return differences


def _compare_column_order(source_schema: Schema, target_schema: Schema,
                          source: ObjectsByKind, target: ObjectsByKind,
                          partitions_on_both_sides: set[tuple[str, ...]]) -> list[Difference]:
    """Report tables whose shared columns come in a different order (a low-severity finding).

    Only columns visible after the ignore rules and present on both sides count, so an added
    or dropped column is not also reported as a change of order.
    """
    differences: list[Difference] = []
    for table_key in sorted(source["table"].keys() & target["table"].keys()):
        source_columns = source_schema.column_orders.get(table_key, ())
        target_columns = target_schema.column_orders.get(table_key, ())
        if source_columns == target_columns or table_key in partitions_on_both_sides:
            continue
        shared = {name for name in source_columns if (*table_key, name) in source["column"]}
        shared &= {name for name in target_columns if (*table_key, name) in target["column"]}
        source_order = [name for name in source_columns if name in shared]
        target_order = [name for name in target_columns if name in shared]
        if source_order == target_order:
            continue
        quoted = _quoted_columns(source, table_key)
        differences.append(_difference(
            "table", source["table"][table_key].name, COLUMN_ORDER,
            ", ".join(quoted[name] for name in source_order),
            ", ".join(quoted[name] for name in target_order),
            _property_hazard("table", COLUMN_ORDER, None, None)))
    return differences


def _quoted_columns(objects: ObjectsByKind, table_key: tuple[str, ...]) -> dict[str, str]:
    """Map a table's column names to their quoted forms, taken from the display names."""
    table_name = objects["table"][table_key].name
    return {key[2]: column.name[len(table_name) + 1:]
            for key, column in objects["column"].items() if key[:2] == table_key}


def _summary(source: ObjectsByKind, target: ObjectsByKind) -> dict[str, dict[str, int]]:
    return {
        PLURAL_KIND_NAMES[kind]: {"source": len(source[kind]), "target": len(target[kind])}
        for kind in OBJECT_KINDS
    }


def compare(source: Schema, target: Schema, options: DiffOptions = DEFAULT_OPTIONS) -> DiffResult:
    """Compare two snapshots and return every difference, after the ignore rules."""
    source_objects = visible_objects(source, options)
    target_objects = visible_objects(target, options)

    partitions_on_both_sides = _partitions(source_objects) & _partitions(target_objects)
    differences: list[Difference] = []
    for kind in OBJECT_KINDS:
        differences.extend(
            _compare_kind(kind, source_objects, target_objects, partitions_on_both_sides))
    if COLUMN_ORDER not in options.ignore_kinds and "column" not in options.ignore_kinds:
        differences.extend(_compare_column_order(
            source, target, source_objects, target_objects, partitions_on_both_sides))

    return DiffResult(
        summary=MappingProxyType(_summary(source_objects, target_objects)),
        differences=tuple(differences),
    )
