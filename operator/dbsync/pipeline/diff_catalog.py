"""Catalog introspection for the schema diff: one query per object kind, read from ``pg_catalog``.

The session is pinned before reading (``search_path``, ``TimeZone``, ``DateStyle`` and the other
settings that change how the server prints expressions), so that two databases built from the
same script give identical snapshots whatever the caller's session looked like. Every
expression is rendered by the server itself (``pg_get_expr``, ``format_type``,
``pg_get_indexdef``, ``pg_get_constraintdef``, ``pg_get_viewdef``, ``pg_get_triggerdef``).

The queries work on PostgreSQL 14 to 18. Columns that newer versions added are read only when
``server_version_num`` shows they exist, and are given the value older servers imply.

NOTE: composite types, range types, foreign tables, rules, privileges, extended statistics,
publications and event triggers are not read, so differences in them go unreported.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg import pq

from dbsync.pipeline.dsn import redact_text
from dbsync.pipeline.errors import EXIT_USAGE, DbsyncError, LockTimeoutError

logger = logging.getLogger("dbsync.diff")

# PostgreSQL 14 introduced SQL-standard function bodies (prosqlbody), which the queries read.
MINIMUM_SERVER_VERSION_NUM = 140000

# Settings that change how the server prints expressions, names, literals and numbers. They are
# set with SET LOCAL inside the introspection transaction, which is rolled back at the end, so
# the caller's session is left as it was.
PINNED_SETTINGS: Mapping[str, str] = MappingProxyType({
    "search_path": "pg_catalog",
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "lc_numeric": "C",
    "standard_conforming_strings": "on",
    "quote_all_identifiers": "off",
    "xmloption": "content",
    "lock_timeout": "30s",
})

# Kinds of catalog objects, in the order the diff reports them. Names are singular, as in
# Difference.kind; the summary uses the plural forms below.
OBJECT_KINDS: tuple[str, ...] = (
    "schema", "extension", "enum", "domain", "sequence", "table", "column", "constraint",
    "index", "view", "materialized_view", "function", "procedure", "trigger", "policy",
)
PLURAL_KIND_NAMES: Mapping[str, str] = MappingProxyType({
    "schema": "schemas", "extension": "extensions", "enum": "enums", "domain": "domains",
    "sequence": "sequences", "table": "tables", "column": "columns",
    "constraint": "constraints", "index": "indexes", "view": "views",
    "materialized_view": "materialized_views", "function": "functions",
    "procedure": "procedures", "trigger": "triggers", "policy": "policies",
})


class SchemaIntrospectionError(DbsyncError):
    """Reading a database's catalog failed (too old a server, missing privileges)."""

    reason = "IntrospectionFailed"
    exit_code = EXIT_USAGE


PropertyValue = str | None


@dataclass(frozen=True, slots=True)
class CatalogObject:
    """One schema object as read from the catalog, with the properties the diff compares.

    ``key`` is the object's identity (schema and name, plus table or argument types where
    PostgreSQL scopes names that way). ``owner`` is the (schema, name) of the table or view an
    object belongs to, so an object is not reported again when its whole table is missing.
    """

    kind: str
    key: tuple[str, ...]
    name: str
    # Names and values are kept apart so that equal objects compare as two value tuples.
    property_names: tuple[str, ...]
    values: tuple[PropertyValue, ...]
    owner: tuple[str, str] | None = None
    position: int = 0

    @property
    def schema(self) -> str:
        return self.key[0]

    @property
    def properties(self) -> tuple[tuple[str, PropertyValue], ...]:
        """(name, value) pairs in the order the diff reports them."""
        return tuple(zip(self.property_names, self.values, strict=True))

    def property_map(self) -> dict[str, PropertyValue]:
        return dict(zip(self.property_names, self.values, strict=True))


def _catalog_object(*, kind: str, key: tuple[str, ...], name: str,
                    properties: Sequence[tuple[str, PropertyValue]],
                    owner: tuple[str, str] | None = None) -> CatalogObject:
    return CatalogObject(kind=kind, key=key, name=name,
                         property_names=tuple(pair[0] for pair in properties),
                         values=tuple(pair[1] for pair in properties), owner=owner)


@dataclass(frozen=True)
class Schema:
    """Frozen snapshot of one database's schema: objects by kind, then by identity key."""

    server_version_num: int
    objects: Mapping[str, Mapping[tuple[str, ...], CatalogObject]] = field(
        default_factory=lambda: MappingProxyType({}))
    # Column names (unquoted) of each table, by (schema, table), in attribute number order.
    column_orders: Mapping[tuple[str, ...], tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}))

    def of_kind(self, kind: str) -> Mapping[tuple[str, ...], CatalogObject]:
        return self.objects.get(kind, MappingProxyType({}))


# --- SQL -----------------------------------------------------------------------------------------

# Schemas that belong to the server rather than the application.
_SYSTEM_SCHEMA_FILTER = (
    "{n}.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
    "AND {n}.nspname NOT LIKE 'pg\\_temp\\_%' AND {n}.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'"
)


def _user_schema(alias: str) -> str:
    return _SYSTEM_SCHEMA_FILTER.format(n=alias)


def _not_extension_member(catalog: str, oid_expression: str) -> str:
    # Objects created by CREATE EXTENSION are compared through the extension's version. The
    # uncorrelated NOT IN runs once as a hashed subplan instead of one probe per row.
    return (
        f"{oid_expression} NOT IN (SELECT ext_dep.objid FROM pg_depend ext_dep "
        f"WHERE ext_dep.classid = '{catalog}'::regclass AND ext_dep.deptype = 'e')"
    )


_SCHEMAS_SQL = f"""
SELECT n.nspname, quote_ident(n.nspname), d.description
FROM pg_namespace n
LEFT JOIN pg_description d
  ON d.objoid = n.oid AND d.classoid = 'pg_namespace'::regclass AND d.objsubid = 0
WHERE {_user_schema('n')} AND {_not_extension_member('pg_namespace', 'n.oid')}
"""

_EXTENSIONS_SQL = """
SELECT e.extname, quote_ident(e.extname), e.extversion, n.nspname
FROM pg_extension e
JOIN pg_namespace n ON n.oid = e.extnamespace
"""

_TABLES_SQL = f"""
SELECT n.nspname, c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname),
  c.relkind, c.relpersistence, c.relrowsecurity, c.relforcerowsecurity,
  CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
  CASE WHEN c.relispartition THEN
    (SELECT i.inhparent::regclass::text FROM pg_inherits i WHERE i.inhrelid = c.oid)
    || ' ' || pg_get_expr(c.relpartbound, c.oid) END,
  CASE WHEN NOT c.relispartition THEN
    (SELECT string_agg(i.inhparent::regclass::text, ', ' ORDER BY i.inhseqno)
     FROM pg_inherits i WHERE i.inhrelid = c.oid) END,
  array_to_string(c.reloptions, ', '),
  d.description
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_description d
  ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
WHERE c.relkind IN ('r', 'p') AND {_user_schema('n')}
  AND {_not_extension_member('pg_class', 'c.oid')}
"""

_COLUMNS_SQL = f"""
SELECT n.nspname, c.relname, a.attname, a.attnum, a.attrelid, quote_ident(a.attname),
  format_type(a.atttypid, a.atttypmod) || repeat('[]', greatest(a.attndims - 1, 0)),
  CASE WHEN a.attcollation <> t.typcollation THEN a.attcollation::regcollation::text END,
  CASE WHEN a.attnotnull THEN 'yes' ELSE 'no' END,
  CASE WHEN a.attgenerated = '' THEN pg_get_expr(ad.adbin, ad.adrelid) END,
  CASE a.attidentity WHEN 'a' THEN 'ALWAYS' WHEN 'd' THEN 'BY DEFAULT' END,
  CASE WHEN a.attidentity <> '' THEN
    (SELECT format('AS %s START WITH %s INCREMENT BY %s MINVALUE %s MAXVALUE %s CACHE %s%s',
                   format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin,
                   s.seqmax, s.seqcache, CASE WHEN s.seqcycle THEN ' CYCLE' ELSE '' END)
     FROM pg_depend dep JOIN pg_sequence s ON s.seqrelid = dep.objid
     WHERE dep.classid = 'pg_class'::regclass AND dep.refclassid = 'pg_class'::regclass
       AND dep.refobjid = a.attrelid AND dep.refobjsubid = a.attnum AND dep.deptype = 'i') END,
  CASE WHEN a.attgenerated <> '' THEN
    CASE a.attgenerated WHEN 's' THEN 'STORED ' ELSE 'VIRTUAL ' END
    || pg_get_expr(ad.adbin, ad.adrelid) END,
  d.description
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
LEFT JOIN pg_description d
  ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = a.attnum
WHERE c.relkind IN ('r', 'p') AND a.attnum > 0
  AND NOT a.attisdropped AND {_user_schema('n')}
  AND {_not_extension_member('pg_class', 'c.oid')}
"""

# The order of _column_object's values, which the columns query returns from its 7th column.
_COLUMN_PROPERTIES = ("type", "collation", "not_null", "default", "identity",
                      "identity_sequence", "generated", "comment")


def _constraints_sql(version: int) -> str:
    # NULLS NOT DISTINCT and ON DELETE SET NULL (columns) arrived in 15, NOT ENFORCED in 18.
    # Column numbers are turned into names with the map the columns query filled.
    nulls_not_distinct = (
        "(SELECT i.indnullsnotdistinct FROM pg_index i WHERE i.indexrelid = con.conindid)"
        if version >= 150000 else "false")
    delete_set_columns = "con.confdelsetcols" if version >= 150000 else "NULL::int2[]"
    enforced = "con.conenforced" if version >= 180000 else "true"
    return f"""
SELECT n.nspname, c.relname, con.conname,
  quote_ident(n.nspname) || '.' || quote_ident(c.relname) || '.' || quote_ident(con.conname),
  con.contype,
  CASE WHEN con.contype IN ('p', 'u', 'x') THEN pg_get_constraintdef(con.oid) END,
  CASE WHEN con.contype = 'c' THEN pg_get_expr(con.conbin, con.conrelid) END,
  con.conrelid, con.conkey,
  CASE WHEN con.contype = 'f' THEN con.confrelid::regclass::text END, con.confrelid,
  con.confkey, con.confupdtype, con.confdeltype, {delete_set_columns}, con.confmatchtype,
  con.condeferrable, con.condeferred, con.convalidated, con.connoinherit, {enforced},
  CASE WHEN con.contype = 'u' THEN {nulls_not_distinct} END
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype IN ('p', 'u', 'f', 'c', 'x') AND con.conparentid = 0 AND con.conislocal
  AND c.relkind IN ('r', 'p') AND {_user_schema('n')}
  AND {_not_extension_member('pg_class', 'c.oid')}
"""


def _indexes_sql(version: int) -> str:
    nulls_not_distinct = "i.indnullsnotdistinct" if version >= 150000 else "false"
    # Indexes that implement a primary key, unique or exclusion constraint are compared as
    # that constraint, so they are left out here.
    return f"""
SELECT n.nspname, ic.relname, quote_ident(n.nspname) || '.' || quote_ident(ic.relname),
  tn.nspname, t.relname, t.oid::regclass::text, t.relkind, quote_ident(ic.relname),
  pg_get_indexdef(i.indexrelid), i.indisunique, pg_get_expr(i.indpred, i.indrelid),
  i.indisvalid, {nulls_not_distinct},
  (SELECT inh.inhparent::regclass::text FROM pg_inherits inh WHERE inh.inhrelid = ic.oid)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace tn ON tn.oid = t.relnamespace
WHERE t.relkind IN ('r', 'p', 'm') AND {_user_schema('n')}
  AND {_not_extension_member('pg_class', 't.oid')}
  AND NOT EXISTS (
    SELECT 1 FROM pg_constraint con
    WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid
      AND con.contype IN ('p', 'u', 'x'))
"""


# Sequences that implement identity columns (dependency type 'i') are compared as part of
# their column, so only standalone and serial-style sequences are listed here.
_SEQUENCES_SQL = f"""
SELECT n.nspname, c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname),
  format_type(s.seqtypid, NULL), s.seqstart::text, s.seqincrement::text, s.seqmin::text,
  s.seqmax::text, s.seqcache::text, s.seqcycle,
  owner_namespace.nspname, owner_table.relname,
  owner_table.oid::regclass::text || '.' || quote_ident(owner_column.attname)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_sequence s ON s.seqrelid = c.oid
LEFT JOIN pg_depend owned
  ON owned.classid = 'pg_class'::regclass AND owned.objid = c.oid
  AND owned.refclassid = 'pg_class'::regclass AND owned.deptype = 'a'
LEFT JOIN pg_class owner_table ON owner_table.oid = owned.refobjid
LEFT JOIN pg_namespace owner_namespace ON owner_namespace.oid = owner_table.relnamespace
LEFT JOIN pg_attribute owner_column
  ON owner_column.attrelid = owned.refobjid AND owner_column.attnum = owned.refobjsubid
WHERE c.relkind = 'S' AND {_user_schema('n')}
  AND {_not_extension_member('pg_class', 'c.oid')}
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend identity_dep
    WHERE identity_dep.classid = 'pg_class'::regclass AND identity_dep.objid = c.oid
      AND identity_dep.deptype = 'i')
"""

_VIEWS_SQL = f"""
SELECT n.nspname, c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname),
  c.relkind, pg_get_viewdef(c.oid), array_to_string(c.reloptions, ', '), d.description
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_description d
  ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
WHERE c.relkind IN ('v', 'm') AND {_user_schema('n')}
  AND {_not_extension_member('pg_class', 'c.oid')}
"""

_FUNCTIONS_SQL = f"""
SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid),
  quote_ident(n.nspname) || '.' || quote_ident(p.proname)
    || '(' || pg_get_function_identity_arguments(p.oid) || ')',
  p.prokind, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), l.lanname,
  CASE WHEN p.prosqlbody IS NOT NULL THEN pg_get_function_sqlbody(p.oid) ELSE p.prosrc END,
  p.provolatile, p.prosecdef, p.proisstrict, p.proleakproof, p.proparallel,
  array_to_string(p.proconfig, ', ')
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE {_user_schema('n')} AND {_not_extension_member('pg_proc', 'p.oid')}
"""

# Internal triggers (those behind foreign keys) and the clones PostgreSQL creates on each
# partition are left out: the first are covered by the constraint, the second by the parent.
_TRIGGERS_SQL = f"""
SELECT n.nspname, c.relname, t.tgname,
  quote_ident(n.nspname) || '.' || quote_ident(c.relname) || '.' || quote_ident(t.tgname),
  pg_get_triggerdef(t.oid), t.tgenabled
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND {_user_schema('n')}
  AND {_not_extension_member('pg_class', 'c.oid')}
"""

_ENUMS_SQL = f"""
SELECT n.nspname, t.typname, quote_ident(n.nspname) || '.' || quote_ident(t.typname),
  (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
   FROM pg_enum e WHERE e.enumtypid = t.oid)
FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.typtype = 'e' AND {_user_schema('n')}
  AND {_not_extension_member('pg_type', 't.oid')}
"""

# A domain's NOT NULL is read from typnotnull: PostgreSQL 17 and later also store it as a
# constraint of type 'n', which is skipped so that all versions report it the same way.
_DOMAINS_SQL = f"""
SELECT n.nspname, t.typname, quote_ident(n.nspname) || '.' || quote_ident(t.typname),
  format_type(t.typbasetype, t.typtypmod), pg_get_expr(t.typdefaultbin, 0), t.typnotnull,
  CASE WHEN t.typcollation <> base.typcollation THEN t.typcollation::regcollation::text END,
  (SELECT string_agg(quote_ident(con.conname) || ' ' || pg_get_constraintdef(con.oid), ', '
                     ORDER BY con.conname)
   FROM pg_constraint con WHERE con.contypid = t.oid AND con.contype = 'c')
FROM pg_type t
JOIN pg_type base ON base.oid = t.typbasetype
JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.typtype = 'd' AND {_user_schema('n')}
  AND {_not_extension_member('pg_type', 't.oid')}
"""

_POLICIES_SQL = f"""
SELECT n.nspname, c.relname, pol.polname,
  quote_ident(n.nspname) || '.' || quote_ident(c.relname) || '.' || quote_ident(pol.polname),
  pol.polcmd, pol.polpermissive,
  CASE WHEN pol.polroles = '{{0}}'::oid[] THEN 'PUBLIC' ELSE
    (SELECT string_agg(quote_ident(r.rolname), ', ' ORDER BY r.rolname)
     FROM pg_roles r WHERE r.oid = ANY (pol.polroles)) END,
  pg_get_expr(pol.polqual, pol.polrelid), pg_get_expr(pol.polwithcheck, pol.polrelid)
FROM pg_policy pol
JOIN pg_class c ON c.oid = pol.polrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE {_user_schema('n')} AND {_not_extension_member('pg_class', 'c.oid')}
"""


# --- Row conversion ------------------------------------------------------------------------------

Row = Sequence[Any]


@dataclass
class _ReadContext:
    """Lookups filled by earlier queries and used to convert the rows of later ones."""

    table_names: dict[tuple[str, str], str] = field(default_factory=dict)
    column_names: dict[tuple[int, int], str] = field(default_factory=dict)
    column_positions: dict[tuple[str, str], list[tuple[int, str]]] = field(default_factory=dict)

    def column_list(self, relation_oid: int, attnums: Sequence[int] | None) -> str | None:
        if not attnums:
            return None
        # A relation the columns query did not read (one owned by an extension) shows
        # column numbers instead of names.
        return ", ".join(self.column_names.get((relation_oid, attnum), f"#{attnum}")
                         for attnum in attnums)

_TABLE_KINDS = {"r": "table", "p": "partitioned table"}
_PERSISTENCE = {"p": "permanent", "u": "unlogged", "t": "temporary"}
_CONSTRAINT_TYPES = {
    "p": "primary key", "u": "unique", "f": "foreign key", "c": "check", "x": "exclusion"}
_FOREIGN_KEY_ACTIONS = {
    "a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
_FOREIGN_KEY_MATCH = {"f": "FULL", "p": "PARTIAL", "s": "SIMPLE"}
_VOLATILITY = {"i": "IMMUTABLE", "s": "STABLE", "v": "VOLATILE"}
_PARALLEL = {"s": "SAFE", "r": "RESTRICTED", "u": "UNSAFE"}
_PROCEDURE_KINDS = {"f": "function", "p": "procedure", "a": "aggregate", "w": "window"}
_TRIGGER_STATES = {"O": "ENABLED", "D": "DISABLED", "R": "ENABLED REPLICA", "A": "ENABLED ALWAYS"}
_POLICY_COMMANDS = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}

# Clauses pg_get_constraintdef appends after the definition proper; they are compared as
# their own properties, so they are cut off the definition text.
_CONSTRAINT_SUFFIXES = (" NOT VALID", " NOT ENFORCED", " INITIALLY DEFERRED", " DEFERRABLE")


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def _strip_constraint_suffixes(definition: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for suffix in _CONSTRAINT_SUFFIXES:
            if definition.endswith(suffix):
                definition = definition[: -len(suffix)]
                stripped = True
    return definition


def _schema_object(row: Row) -> CatalogObject:
    schema, display, comment = row
    return _catalog_object(kind="schema", key=(schema,), name=display,
                         properties=(("comment", comment),))


def _extension_object(row: Row) -> CatalogObject:
    name, display, version, schema = row
    # Extensions are database-wide, so their key is the name alone (not a schema).
    return _catalog_object(kind="extension", key=(name,), name=display,
                         properties=(("version", version), ("schema", schema)))


def _table_object(row: Row, context: _ReadContext) -> CatalogObject:
    (schema, name, display, relkind, persistence, rls_enabled, rls_forced, partition_key,
     partition, inherits, options, comment) = row
    context.table_names[(schema, name)] = display
    kind = _TABLE_KINDS[relkind]
    if partition_key:
        kind = f"{kind} PARTITION BY {partition_key}"
    return _catalog_object(kind="table", key=(schema, name), name=display, properties=(
        ("kind", kind),
        ("partition", f"PARTITION OF {partition}" if partition else None),
        ("inherits", inherits),
        ("persistence", _PERSISTENCE.get(persistence, persistence)),
        ("row_level_security", _yes_no(rls_enabled)),
        ("force_row_level_security", _yes_no(rls_forced)),
        ("storage_parameters", options or None),
        ("comment", comment),
    ))


def _column_object(row: Row, context: _ReadContext) -> CatalogObject:
    # The query renders every property, because this runs once per column of the database.
    schema, table, name, position, relation_oid, quoted_name = row[:6]
    context.column_names[(relation_oid, position)] = quoted_name
    context.column_positions.setdefault((schema, table), []).append((position, name))
    # The table's display name comes from the tables query, which reads the same relations.
    return CatalogObject(
        kind="column", key=(schema, table, name),
        name=f"{context.table_names[(schema, table)]}.{quoted_name}",
        property_names=_COLUMN_PROPERTIES, values=tuple(row[6:]), owner=(schema, table),
        position=position)


def _constraint_object(row: Row, context: _ReadContext) -> CatalogObject:
    (schema, table, name, display, contype, definition, check_expression, relation_oid,
     key_attnums, referenced_table, referenced_oid, referenced_attnums, update_action,
     delete_action, delete_set_attnums, match_type, deferrable, deferred, validated, no_inherit,
     enforced, nulls_not_distinct) = row
    properties: list[tuple[str, PropertyValue]] = [("type", _CONSTRAINT_TYPES[contype])]

    if contype in ("p", "u", "x"):
        # The definition carries columns, INCLUDE, index parameters and, for exclusion
        # constraints, operators and predicate. NULLS NOT DISTINCT is its own property.
        text = _strip_constraint_suffixes(definition)
        if nulls_not_distinct:
            text = text.replace("UNIQUE NULLS NOT DISTINCT", "UNIQUE", 1)
        properties.append(("definition", text))
        if contype == "u":
            properties.append(("nulls_not_distinct", _yes_no(nulls_not_distinct)))
    elif contype == "f":
        on_delete = _FOREIGN_KEY_ACTIONS[delete_action]
        delete_set_columns = context.column_list(relation_oid, delete_set_attnums)
        if delete_set_columns:
            on_delete = f"{on_delete} ({delete_set_columns})"
        # NOTE: the PERIOD marker of a PostgreSQL 18 temporal foreign key is not compared.
        referenced_columns = context.column_list(referenced_oid, referenced_attnums)
        properties.extend([
            ("columns", context.column_list(relation_oid, key_attnums)),
            ("references", f"{referenced_table} ({referenced_columns})"),
            ("on_update", _FOREIGN_KEY_ACTIONS[update_action]),
            ("on_delete", on_delete),
            ("match", _FOREIGN_KEY_MATCH[match_type]),
        ])
    else:
        properties.extend([("expression", check_expression), ("no_inherit", _yes_no(no_inherit))])

    properties.extend([
        ("deferrable", _yes_no(deferrable)),
        ("initially_deferred", _yes_no(deferred)),
        ("validated", _yes_no(validated)),
        ("enforced", _yes_no(enforced)),
    ])
    return _catalog_object(kind="constraint", key=(schema, table, name), name=display,
                         owner=(schema, table), properties=tuple(properties))


def _index_body(definition: str, *, unique: bool, quoted_name: str, table: str, relkind: str,
                predicate: str | None, nulls_not_distinct: bool) -> str:
    """Cut the parts compared as their own properties out of ``pg_get_indexdef`` output.

    What remains is the access method, key columns or expressions with their operator
    classes, collations and ordering, INCLUDE columns, storage parameters and tablespace.
    """
    only = "ONLY " if relkind == "p" else ""
    prefix = f"CREATE {'UNIQUE ' if unique else ''}INDEX {quoted_name} ON {only}{table} "
    body = definition[len(prefix):] if definition.startswith(prefix) else definition
    where = f" WHERE {predicate}" if predicate else ""
    if where and body.endswith(where):
        body = body[: -len(where)]
    if nulls_not_distinct:
        body = body.replace(" NULLS NOT DISTINCT", "", 1)
    return body


def _index_object(row: Row) -> CatalogObject:
    (schema, name, display, table_schema, table_name, table, relkind, quoted_name, definition,
     unique, predicate, valid, nulls_not_distinct, parent) = row
    body = _index_body(definition, unique=unique, quoted_name=quoted_name, table=table,
                       relkind=relkind, predicate=predicate,
                       nulls_not_distinct=nulls_not_distinct)
    return _catalog_object(kind="index", key=(schema, name), name=display,
                         owner=(table_schema, table_name), properties=(
        ("table", table),
        ("definition", body),
        ("unique", _yes_no(unique)),
        ("nulls_not_distinct", _yes_no(nulls_not_distinct)),
        ("predicate", predicate),
        ("valid", _yes_no(valid)),
        ("parent_index", parent),
    ))


def _sequence_object(row: Row) -> CatalogObject:
    (schema, name, display, data_type, start, increment, minimum, maximum, cache, cycle,
     owner_schema, owner_table, owned_by) = row
    owner = (owner_schema, owner_table) if owner_table is not None else None
    return _catalog_object(kind="sequence", key=(schema, name), name=display, owner=owner,
                         properties=(
        ("type", data_type),
        ("start", start),
        ("increment", increment),
        ("minimum", minimum),
        ("maximum", maximum),
        ("cache", cache),
        ("cycle", _yes_no(cycle)),
        ("owned_by", owned_by),
    ))


def _view_object(row: Row) -> CatalogObject:
    schema, name, display, relkind, definition, options, comment = row
    kind = "materialized_view" if relkind == "m" else "view"
    return _catalog_object(kind=kind, key=(schema, name), name=display, properties=(
        ("definition", definition),
        ("options", options or None),
        ("comment", comment),
    ))


def _function_object(row: Row) -> CatalogObject:
    (schema, name, identity_arguments, display, prokind, arguments, result, language, body,
     volatility, security_definer, strict, leakproof, parallel, config) = row
    kind = "procedure" if prokind == "p" else "function"
    properties: list[tuple[str, PropertyValue]] = []
    if kind == "function":
        properties.append(("function_kind", _PROCEDURE_KINDS.get(prokind, prokind)))
    properties.extend([
        ("arguments", arguments),
        ("returns", result),
        ("language", language),
        ("body", body),
        ("volatility", _VOLATILITY.get(volatility, volatility)),
        ("security_definer", _yes_no(security_definer)),
        ("strict", _yes_no(strict)),
        ("leakproof", _yes_no(leakproof)),
        ("parallel", _PARALLEL.get(parallel, parallel)),
        ("configuration", config or None),
    ])
    return _catalog_object(kind=kind, key=(schema, name, identity_arguments), name=display,
                         properties=tuple(properties))


def _trigger_object(row: Row) -> CatalogObject:
    schema, table, name, display, definition, enabled = row
    return _catalog_object(kind="trigger", key=(schema, table, name), name=display,
                         owner=(schema, table), properties=(
        ("definition", definition),
        ("enabled", _TRIGGER_STATES.get(enabled, enabled)),
    ))


def _enum_object(row: Row) -> CatalogObject:
    schema, name, display, labels = row
    return _catalog_object(kind="enum", key=(schema, name), name=display,
                         properties=(("labels", labels),))


def _domain_object(row: Row) -> CatalogObject:
    schema, name, display, base_type, default, not_null, collation, constraints = row
    return _catalog_object(kind="domain", key=(schema, name), name=display, properties=(
        ("base_type", base_type),
        ("default", default),
        ("not_null", _yes_no(not_null)),
        ("collation", collation),
        ("constraints", constraints),
    ))


def _policy_object(row: Row) -> CatalogObject:
    schema, table, name, display, command, permissive, roles, using, with_check = row
    return _catalog_object(kind="policy", key=(schema, table, name), name=display,
                         owner=(schema, table), properties=(
        ("command", _POLICY_COMMANDS.get(command, command)),
        ("permissive", "PERMISSIVE" if permissive else "RESTRICTIVE"),
        ("roles", roles),
        ("using", using),
        ("with_check", with_check),
    ))


@dataclass(frozen=True)
class _CatalogQuery:
    label: str
    sql: Callable[[int], str]
    to_object: Callable[[Row, _ReadContext], CatalogObject]


def _fixed(text: str) -> Callable[[int], str]:
    return lambda _version: text


def _plain(convert: Callable[[Row], CatalogObject]
           ) -> Callable[[Row, _ReadContext], CatalogObject]:
    return lambda row, _context: convert(row)


# Order matters: each query may use names that the queries before it stored in the context.
_QUERIES: tuple[_CatalogQuery, ...] = (
    _CatalogQuery("schemas", _fixed(_SCHEMAS_SQL), _plain(_schema_object)),
    _CatalogQuery("extensions", _fixed(_EXTENSIONS_SQL), _plain(_extension_object)),
    _CatalogQuery("tables", _fixed(_TABLES_SQL), _table_object),
    _CatalogQuery("columns", _fixed(_COLUMNS_SQL), _column_object),
    _CatalogQuery("constraints", _constraints_sql, _constraint_object),
    _CatalogQuery("indexes", _indexes_sql, _plain(_index_object)),
    _CatalogQuery("sequences", _fixed(_SEQUENCES_SQL), _plain(_sequence_object)),
    _CatalogQuery("views", _fixed(_VIEWS_SQL), _plain(_view_object)),
    _CatalogQuery("functions", _fixed(_FUNCTIONS_SQL), _plain(_function_object)),
    _CatalogQuery("triggers", _fixed(_TRIGGERS_SQL), _plain(_trigger_object)),
    _CatalogQuery("enums", _fixed(_ENUMS_SQL), _plain(_enum_object)),
    _CatalogQuery("domains", _fixed(_DOMAINS_SQL), _plain(_domain_object)),
    _CatalogQuery("policies", _fixed(_POLICIES_SQL), _plain(_policy_object)),
)


# --- Introspection -------------------------------------------------------------------------------

def _pin_settings(cursor: psycopg.Cursor[Any]) -> None:
    names = list(PINNED_SETTINGS)
    calls = ", ".join(f"set_config(%s, %s, true) AS s{index}" for index in range(len(names)))
    params: list[str] = []
    for name in names:
        params.extend([name, PINNED_SETTINGS[name]])
    cursor.execute(f"SELECT {calls}", params)


def _read_catalog(connection: psycopg.Connection[Any]) -> Schema:
    version = connection.info.server_version
    if version < MINIMUM_SERVER_VERSION_NUM:
        raise SchemaIntrospectionError(
            f"the schema diff needs PostgreSQL 14 or later, but the server reports "
            f"server_version_num {version}: upgrade the server or compare with pg_dump")

    context = _ReadContext()
    objects: dict[str, dict[tuple[str, ...], CatalogObject]] = {kind: {} for kind in OBJECT_KINDS}
    # In pipeline mode every query is sent at once, so the server works on the next ones while
    # this process converts the rows of the first.
    pipeline = (connection.pipeline() if psycopg.Pipeline.is_supported()
                else contextlib.nullcontext())
    with pipeline:
        _pin_settings(connection.cursor())
        cursors = []
        for query in _QUERIES:
            cursor = connection.cursor()
            cursor.execute(query.sql(version))
            cursors.append(cursor)
        for query, cursor in zip(_QUERIES, cursors, strict=True):
            for row in cursor.fetchall():
                item = query.to_object(row, context)
                objects[item.kind][item.key] = item
            logger.debug("read %s from the catalog", query.label)

    column_orders: dict[tuple[str, ...], tuple[str, ...]] = {
        table: tuple(name for _, name in sorted(columns))
        for table, columns in context.column_positions.items()}
    return Schema(
        server_version_num=version,
        objects=MappingProxyType(
            {kind: MappingProxyType(items) for kind, items in objects.items()}),
        column_orders=MappingProxyType(column_orders),
    )


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block, if it was running.

    A snapshot allocates tens of thousands of small objects, none of them in reference
    cycles, and the collector's passes over them cost about a quarter of the client's CPU
    time. The pause is process-wide, so it is kept to the block, and reference counting still
    frees memory as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def introspect(connection: psycopg.Connection[Any]) -> Schema:
    """Read the schema of the database behind ``connection`` into a frozen snapshot.

    The reads run in a REPEATABLE READ READ ONLY transaction (a savepoint when the caller
    already has a transaction open, which then keeps the caller's isolation level). The
    transaction or savepoint is rolled back at the end, so pinned settings do not leak into
    the caller's session.
    """
    status = connection.info.transaction_status
    saved_isolation = connection.isolation_level
    saved_read_only = connection.read_only
    top_level = status == pq.TransactionStatus.IDLE
    if top_level:
        connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        connection.read_only = True

    try:
        with connection.transaction(force_rollback=True), garbage_collection_paused():
            return _read_catalog(connection)
    except psycopg.errors.LockNotAvailable as error:
        raise LockTimeoutError(
            f"reading the catalog waited more than {PINNED_SETTINGS['lock_timeout']} for a "
            f"lock ({error.diag.message_primary}): retry when the schema change holding it "
            "has finished") from None
    except psycopg.errors.InsufficientPrivilege as error:
        raise SchemaIntrospectionError(
            f"reading the catalog was denied ({error.diag.message_primary}): connect as a "
            "role that can read every schema being compared") from None
    except psycopg.Error as error:
        detail = redact_text(str(error).strip().splitlines()[0] if str(error).strip()
                             else type(error).__name__)
        raise SchemaIntrospectionError(
            f"reading the catalog failed ({detail}): check that the server is PostgreSQL 14 "
            "or later and still reachable, then retry") from None
    finally:
        if top_level:
            connection.isolation_level = saved_isolation
            connection.read_only = saved_read_only
