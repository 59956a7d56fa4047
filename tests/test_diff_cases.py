"""Schema diff, one property at a time: two databases that differ in exactly one property.

Each case runs a common base script on both databases, then its own script on each side, and
expects exactly one difference. The scripts run inside a transaction that is rolled back after
the snapshot, so one pair of databases serves every case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from dbsync.pipeline.diff import Hazard, Schema, compare, diff_databases, introspect
from dbsync.testing.servers import TestServer

BASE_SQL = """
CREATE TABLE accounts (
    id bigint PRIMARY KEY,
    number bigint UNIQUE,
    owner text NOT NULL,
    balance numeric(12,2) NOT NULL DEFAULT 0,
    code varchar(10),
    note text
);
CREATE TABLE transfers (
    id bigint PRIMARY KEY,
    account_id bigint NOT NULL,
    amount numeric(12,2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    memo text
);
CREATE TABLE archived_accounts (id bigint PRIMARY KEY);
"""


@dataclass(frozen=True)
class DiffCase:
    """Extra SQL for each side and the single difference expected between them."""

    case_id: str
    source_sql: str
    target_sql: str
    kind: str
    name: str
    property: str
    hazard: Hazard
    min_server_version_num: int = 140000


def _case(case_id: str, source_sql: str, target_sql: str,
          expected: tuple[str, str, str, Hazard], min_server_version_num: int = 140000
          ) -> DiffCase:
    kind, name, property_name, hazard = expected
    return DiffCase(case_id, source_sql, target_sql, kind, name, property_name, hazard,
                    min_server_version_num)


SAFE, WARNING, DESTRUCTIVE = Hazard.SAFE, Hazard.WARNING, Hazard.DESTRUCTIVE
PARTITIONS = """
CREATE TABLE events (id int, at date) PARTITION BY RANGE (at);
CREATE TABLE old_events (id int, at date) PARTITION BY RANGE (at);
"""
FOREIGN_KEY = ("ALTER TABLE transfers ADD CONSTRAINT transfers_account_fkey "
               "FOREIGN KEY (account_id) REFERENCES accounts (id)")
CHECK = "ALTER TABLE transfers ADD CONSTRAINT transfers_amount_check CHECK (amount > 0)"
BOOKINGS = "CREATE TABLE bookings (during tsrange, EXCLUDE USING gist (during WITH {operator}))"
FUNCTION = ("CREATE FUNCTION fee(amount numeric, rate numeric DEFAULT {default}) "
            "RETURNS {returns} LANGUAGE {language} {volatility} {security} "
            "AS 'SELECT amount * rate'")
TRIGGER_FUNCTION = ("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql "
                    "AS 'BEGIN RETURN NEW; END';")
SEQUENCE = "CREATE SEQUENCE invoice_numbers AS {type} MINVALUE 1 MAXVALUE {maximum} " \
           "INCREMENT BY {increment} {cycle}"
POLICY = ("ALTER TABLE accounts ENABLE ROW LEVEL SECURITY; "
          "CREATE POLICY own_rows ON accounts FOR {command} TO {role} USING ({using})")
INDEX_PARTITIONS = """
CREATE TABLE ledger (id int, at date) PARTITION BY RANGE (at);
CREATE TABLE ledger_2024 PARTITION OF ledger FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE ledger_2025 PARTITION OF ledger FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE INDEX ledger_id_idx ON ONLY ledger (id);
CREATE INDEX ledger_2024_id_idx ON ledger_2024 (id);
"""


def _sequence(type_name: str = "bigint", maximum: int = 1000000, increment: int = 1,
              cycle: str = "NO CYCLE") -> str:
    return SEQUENCE.format(type=type_name, maximum=maximum, increment=increment, cycle=cycle)


def _function(default: str = "0.01", returns: str = "numeric", language: str = "sql",
              volatility: str = "IMMUTABLE", security: str = "SECURITY INVOKER") -> str:
    # check_function_bodies = off lets the same body be declared in SQL and PL/pgSQL.
    return "SET LOCAL check_function_bodies = off; " + FUNCTION.format(
        default=default, returns=returns, language=language, volatility=volatility,
        security=security)


def _policy(command: str = "ALL", role: str = "PUBLIC", using: str = "balance >= 0") -> str:
    return POLICY.format(command=command, role=role, using=using)


CASES: tuple[DiffCase, ...] = (
    # Schemas and extensions.
    _case("schema missing", "CREATE SCHEMA reporting", "",
          ("schema", "reporting", "exists", SAFE)),
    _case("schema extra", "", "CREATE SCHEMA reporting",
          ("schema", "reporting", "exists", DESTRUCTIVE)),
    _case("extension missing", "CREATE EXTENSION pg_trgm", "",
          ("extension", "pg_trgm", "exists", SAFE)),
    _case("extension version", "CREATE EXTENSION pg_trgm VERSION '1.6'",
          "CREATE EXTENSION pg_trgm VERSION '1.5'",
          ("extension", "pg_trgm", "version", WARNING)),
    # Tables.
    _case("table missing", "CREATE TABLE notes (id int, body text)", "",
          ("table", "public.notes", "exists", SAFE)),
    _case("table extra", "", "CREATE TABLE notes (id int, body text)",
          ("table", "public.notes", "exists", DESTRUCTIVE)),
    _case("table partitioned vs plain",
          "CREATE TABLE events (id int, at date) PARTITION BY RANGE (at)",
          "CREATE TABLE events (id int, at date)",
          ("table", "public.events", "kind", DESTRUCTIVE)),
    _case("table partition key",
          "CREATE TABLE events (id int, at date) PARTITION BY RANGE (at)",
          "CREATE TABLE events (id int, at date) PARTITION BY LIST (id)",
          ("table", "public.events", "kind", DESTRUCTIVE)),
    _case("table partition bounds",
          PARTITIONS + "CREATE TABLE events_2024 PARTITION OF events "
          "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
          PARTITIONS + "CREATE TABLE events_2024 PARTITION OF events "
          "FOR VALUES FROM ('2024-01-01') TO ('2024-07-01')",
          ("table", "public.events_2024", "partition", WARNING)),
    _case("table partition parent",
          PARTITIONS + "CREATE TABLE events_2024 PARTITION OF events "
          "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
          PARTITIONS + "CREATE TABLE events_2024 PARTITION OF old_events "
          "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
          ("table", "public.events_2024", "partition", WARNING)),
    _case("table plain vs partition",
          PARTITIONS + "CREATE TABLE events_2024 PARTITION OF events "
          "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
          PARTITIONS + "CREATE TABLE events_2024 (id int, at date)",
          ("table", "public.events_2024", "partition", WARNING)),
    _case("table persistence", "CREATE TABLE cache (k int)", "CREATE UNLOGGED TABLE cache (k int)",
          ("table", "public.cache", "persistence", WARNING)),
    _case("table row level security", "ALTER TABLE accounts ENABLE ROW LEVEL SECURITY", "",
          ("table", "public.accounts", "row_level_security", SAFE)),
    _case("table forced row level security", "ALTER TABLE accounts FORCE ROW LEVEL SECURITY",
          "", ("table", "public.accounts", "force_row_level_security", SAFE)),
    _case("table comment", "COMMENT ON TABLE accounts IS 'customer accounts'", "",
          ("table", "public.accounts", "comment", SAFE)),
    # Columns.
    _case("column missing nullable", "ALTER TABLE accounts ADD COLUMN closed_at timestamptz", "",
          ("column", "public.accounts.closed_at", "exists", SAFE)),
    _case("column missing not null without default",
          "ALTER TABLE accounts ADD COLUMN region text NOT NULL", "",
          ("column", "public.accounts.region", "exists", WARNING)),
    _case("column extra", "", "ALTER TABLE accounts ADD COLUMN closed_at timestamptz",
          ("column", "public.accounts.closed_at", "exists", DESTRUCTIVE)),
    _case("column type longer varchar", "ALTER TABLE accounts ALTER code TYPE varchar(20)", "",
          ("column", "public.accounts.code", "type", SAFE)),
    _case("column type shorter varchar", "ALTER TABLE accounts ALTER code TYPE varchar(5)", "",
          ("column", "public.accounts.code", "type", DESTRUCTIVE)),
    _case("column type precision", "ALTER TABLE accounts ALTER balance TYPE numeric(14,2)", "",
          ("column", "public.accounts.balance", "type", SAFE)),
    _case("column type scale", "ALTER TABLE accounts ALTER balance TYPE numeric(12,4)", "",
          ("column", "public.accounts.balance", "type", DESTRUCTIVE)),
    _case("column type array dimensions", "ALTER TABLE accounts ADD COLUMN tags text[][]",
          "ALTER TABLE accounts ADD COLUMN tags text[]",
          ("column", "public.accounts.tags", "type", SAFE)),
    _case("column type integer widening", "CREATE TABLE counters (n bigint)",
          "CREATE TABLE counters (n integer)", ("column", "public.counters.n", "type", WARNING)),
    _case("column type text to integer", "CREATE TABLE counters (n integer)",
          "CREATE TABLE counters (n text)", ("column", "public.counters.n", "type", DESTRUCTIVE)),
    _case("column collation", 'ALTER TABLE accounts ALTER owner TYPE text COLLATE "C"', "",
          ("column", "public.accounts.owner", "collation", WARNING)),
    _case("column not null in source", "ALTER TABLE accounts ALTER note SET NOT NULL", "",
          ("column", "public.accounts.note", "not_null", WARNING)),
    _case("column not null in target", "", "ALTER TABLE accounts ALTER note SET NOT NULL",
          ("column", "public.accounts.note", "not_null", SAFE)),
    _case("column default", "ALTER TABLE accounts ALTER note SET DEFAULT ''", "",
          ("column", "public.accounts.note", "default", SAFE)),
    _case("column identity always vs by default",
          "CREATE TABLE journal (id int GENERATED ALWAYS AS IDENTITY, body text)",
          "CREATE TABLE journal (id int GENERATED BY DEFAULT AS IDENTITY, body text)",
          ("column", "public.journal.id", "identity", SAFE)),
    _case("column identity vs plain",
          "CREATE TABLE journal (id int GENERATED ALWAYS AS IDENTITY, body text)",
          "CREATE TABLE journal (id int NOT NULL, body text)",
          ("column", "public.journal.id", "identity", WARNING)),
    _case("column identity sequence options",
          "CREATE TABLE journal (id int GENERATED ALWAYS AS IDENTITY (START WITH 100), body text)",
          "CREATE TABLE journal (id int GENERATED ALWAYS AS IDENTITY, body text)",
          ("column", "public.journal.id", "identity_sequence", SAFE)),
    _case("column generated expression",
          "ALTER TABLE accounts ADD COLUMN doubled numeric "
          "GENERATED ALWAYS AS (balance * 2) STORED",
          "ALTER TABLE accounts ADD COLUMN doubled numeric "
          "GENERATED ALWAYS AS (balance * 3) STORED",
          ("column", "public.accounts.doubled", "generated", WARNING)),
    _case("column comment", "COMMENT ON COLUMN accounts.note IS 'free text'", "",
          ("column", "public.accounts.note", "comment", SAFE)),
    _case("column order", "CREATE TABLE pairs (a int, b int)", "CREATE TABLE pairs (b int, a int)",
          ("table", "public.pairs", "column_order", WARNING)),
    # Constraints.
    _case("constraint primary key", "CREATE TABLE labels (id int PRIMARY KEY, body text)",
          "CREATE TABLE labels (id int NOT NULL, body text)",
          ("constraint", "public.labels.labels_pkey", "exists", WARNING)),
    _case("constraint primary key columns",
          "CREATE TABLE labels (id int, kind int, CONSTRAINT labels_pkey PRIMARY KEY (id, kind))",
          "CREATE TABLE labels (id int, kind int NOT NULL, CONSTRAINT labels_pkey "
          "PRIMARY KEY (id))",
          ("constraint", "public.labels.labels_pkey", "definition", WARNING)),
    _case("constraint unique",
          "ALTER TABLE accounts ADD CONSTRAINT accounts_code_key UNIQUE (code)", "",
          ("constraint", "public.accounts.accounts_code_key", "exists", WARNING)),
    _case("constraint unique nulls not distinct",
          "ALTER TABLE accounts ADD CONSTRAINT accounts_code_key UNIQUE NULLS NOT DISTINCT (code)",
          "ALTER TABLE accounts ADD CONSTRAINT accounts_code_key UNIQUE (code)",
          ("constraint", "public.accounts.accounts_code_key", "nulls_not_distinct", WARNING),
          min_server_version_num=150000),
    _case("constraint foreign key", FOREIGN_KEY, "",
          ("constraint", "public.transfers.transfers_account_fkey", "exists", WARNING)),
    _case("constraint foreign key referenced table", FOREIGN_KEY,
          FOREIGN_KEY.replace("REFERENCES accounts", "REFERENCES archived_accounts"),
          ("constraint", "public.transfers.transfers_account_fkey", "references", WARNING)),
    _case("constraint foreign key referenced columns", FOREIGN_KEY,
          FOREIGN_KEY.replace("accounts (id)", "accounts (number)"),
          ("constraint", "public.transfers.transfers_account_fkey", "references", WARNING)),
    _case("constraint foreign key on delete", FOREIGN_KEY + " ON DELETE CASCADE", FOREIGN_KEY,
          ("constraint", "public.transfers.transfers_account_fkey", "on_delete", WARNING)),
    _case("constraint foreign key on update", FOREIGN_KEY + " ON UPDATE RESTRICT", FOREIGN_KEY,
          ("constraint", "public.transfers.transfers_account_fkey", "on_update", WARNING)),
    _case("constraint foreign key match", FOREIGN_KEY + " MATCH FULL", FOREIGN_KEY,
          ("constraint", "public.transfers.transfers_account_fkey", "match", WARNING)),
    _case("constraint foreign key deferrable", FOREIGN_KEY + " DEFERRABLE", FOREIGN_KEY,
          ("constraint", "public.transfers.transfers_account_fkey", "deferrable", SAFE)),
    _case("constraint foreign key initially deferred",
          FOREIGN_KEY + " DEFERRABLE INITIALLY DEFERRED", FOREIGN_KEY + " DEFERRABLE",
          ("constraint", "public.transfers.transfers_account_fkey", "initially_deferred", SAFE)),
    _case("constraint foreign key not valid", FOREIGN_KEY, FOREIGN_KEY + " NOT VALID",
          ("constraint", "public.transfers.transfers_account_fkey", "validated", WARNING)),
    _case("constraint check expression", CHECK, CHECK.replace(">", ">="),
          ("constraint", "public.transfers.transfers_amount_check", "expression", WARNING)),
    _case("constraint check not valid", CHECK, CHECK + " NOT VALID",
          ("constraint", "public.transfers.transfers_amount_check", "validated", WARNING)),
    _case("constraint check missing not valid", CHECK + " NOT VALID", "",
          ("constraint", "public.transfers.transfers_amount_check", "exists", SAFE)),
    _case("constraint exclusion operator", BOOKINGS.format(operator="&&"),
          BOOKINGS.format(operator="="),
          ("constraint", "public.bookings.bookings_during_excl", "definition", WARNING)),
    _case("constraint exclusion missing", BOOKINGS.format(operator="&&"),
          "CREATE TABLE bookings (during tsrange)",
          ("constraint", "public.bookings.bookings_during_excl", "exists", WARNING)),
    # Indexes.
    _case("index missing", "CREATE INDEX transfers_created_idx ON transfers (created_at)", "",
          ("index", "public.transfers_created_idx", "exists", WARNING)),
    _case("index extra", "", "CREATE INDEX transfers_created_idx ON transfers (created_at)",
          ("index", "public.transfers_created_idx", "exists", SAFE)),
    _case("index uniqueness", "CREATE UNIQUE INDEX accounts_code_idx ON accounts (code)",
          "CREATE INDEX accounts_code_idx ON accounts (code)",
          ("index", "public.accounts_code_idx", "unique", WARNING)),
    _case("index predicate",
          "CREATE INDEX transfers_amount_idx ON transfers (amount) WHERE amount > 0",
          "CREATE INDEX transfers_amount_idx ON transfers (amount) WHERE amount > 10",
          ("index", "public.transfers_amount_idx", "predicate", WARNING)),
    _case("index expression", "CREATE INDEX accounts_owner_idx ON accounts (lower(owner))",
          "CREATE INDEX accounts_owner_idx ON accounts (upper(owner))",
          ("index", "public.accounts_owner_idx", "definition", WARNING)),
    _case("index operator class",
          "CREATE INDEX accounts_owner_idx ON accounts (owner text_pattern_ops)",
          "CREATE INDEX accounts_owner_idx ON accounts (owner)",
          ("index", "public.accounts_owner_idx", "definition", WARNING)),
    _case("index collation",
          'CREATE INDEX accounts_owner_idx ON accounts (owner COLLATE "C")',
          "CREATE INDEX accounts_owner_idx ON accounts (owner)",
          ("index", "public.accounts_owner_idx", "definition", WARNING)),
    _case("index table", "CREATE INDEX id_idx ON accounts (id)",
          "CREATE INDEX id_idx ON transfers (id)",
          ("index", "public.id_idx", "table", WARNING)),
    _case("index unique nulls not distinct",
          "CREATE UNIQUE INDEX accounts_code_idx ON accounts (code) NULLS NOT DISTINCT",
          "CREATE UNIQUE INDEX accounts_code_idx ON accounts (code)",
          ("index", "public.accounts_code_idx", "nulls_not_distinct", WARNING),
          min_server_version_num=150000),
    _case("index attached to partitioned parent",
          INDEX_PARTITIONS + "ALTER INDEX ledger_id_idx ATTACH PARTITION ledger_2024_id_idx",
          INDEX_PARTITIONS,
          ("index", "public.ledger_2024_id_idx", "parent_index", SAFE)),
    # Sequences.
    _case("sequence missing", _sequence(), "",
          ("sequence", "public.invoice_numbers", "exists", SAFE)),
    _case("sequence type", _sequence("bigint"), _sequence("integer"),
          ("sequence", "public.invoice_numbers", "type", WARNING)),
    _case("sequence bounds", _sequence(maximum=1000000), _sequence(maximum=999),
          ("sequence", "public.invoice_numbers", "maximum", WARNING)),
    _case("sequence increment", _sequence(increment=2), _sequence(),
          ("sequence", "public.invoice_numbers", "increment", SAFE)),
    _case("sequence cycle", _sequence(cycle="CYCLE"), _sequence(),
          ("sequence", "public.invoice_numbers", "cycle", SAFE)),
    _case("sequence owner column", _sequence() + " OWNED BY accounts.number", _sequence(),
          ("sequence", "public.invoice_numbers", "owned_by", SAFE)),
    # Views and materialized views.
    _case("view missing", "CREATE VIEW big_transfers AS SELECT id FROM transfers", "",
          ("view", "public.big_transfers", "exists", SAFE)),
    _case("view definition",
          "CREATE VIEW big_transfers AS SELECT id FROM transfers WHERE amount > 100",
          "CREATE VIEW big_transfers AS SELECT id FROM transfers WHERE amount > 1000",
          ("view", "public.big_transfers", "definition", SAFE)),
    _case("materialized view definition",
          "CREATE MATERIALIZED VIEW totals AS SELECT sum(amount) AS total FROM transfers",
          "CREATE MATERIALIZED VIEW totals AS SELECT max(amount) AS total FROM transfers",
          ("materialized_view", "public.totals", "definition", WARNING)),
    # Functions and procedures.
    _case("function missing", _function(), "",
          ("function", "public.fee(amount numeric, rate numeric)", "exists", SAFE)),
    _case("function argument default", _function(default="0.01"), _function(default="0.02"),
          ("function", "public.fee(amount numeric, rate numeric)", "arguments", SAFE)),
    _case("function result type", _function(returns="numeric"), _function(returns="real"),
          ("function", "public.fee(amount numeric, rate numeric)", "returns", SAFE)),
    _case("function body", _function(),
          _function().replace("amount * rate", "amount * rate * 2"),
          ("function", "public.fee(amount numeric, rate numeric)", "body", SAFE)),
    _case("function language", _function(language="sql"), _function(language="plpgsql"),
          ("function", "public.fee(amount numeric, rate numeric)", "language", SAFE)),
    _case("function volatility", _function(volatility="IMMUTABLE"),
          _function(volatility="VOLATILE"),
          ("function", "public.fee(amount numeric, rate numeric)", "volatility", SAFE)),
    _case("function security definer", _function(security="SECURITY DEFINER"), _function(),
          ("function", "public.fee(amount numeric, rate numeric)", "security_definer", SAFE)),
    _case("procedure body",
          "CREATE PROCEDURE settle() LANGUAGE sql AS 'SELECT 1'",
          "CREATE PROCEDURE settle() LANGUAGE sql AS 'SELECT 2'",
          ("procedure", "public.settle()", "body", SAFE)),
    # Triggers.
    _case("trigger missing",
          TRIGGER_FUNCTION + "CREATE TRIGGER transfers_touch BEFORE INSERT ON transfers "
          "FOR EACH ROW EXECUTE FUNCTION touch()", TRIGGER_FUNCTION,
          ("trigger", "public.transfers.transfers_touch", "exists", SAFE)),
    _case("trigger definition",
          TRIGGER_FUNCTION + "CREATE TRIGGER transfers_touch BEFORE INSERT ON transfers "
          "FOR EACH ROW EXECUTE FUNCTION touch()",
          TRIGGER_FUNCTION + "CREATE TRIGGER transfers_touch BEFORE UPDATE ON transfers "
          "FOR EACH ROW EXECUTE FUNCTION touch()",
          ("trigger", "public.transfers.transfers_touch", "definition", SAFE)),
    _case("trigger disabled",
          TRIGGER_FUNCTION + "CREATE TRIGGER transfers_touch BEFORE INSERT ON transfers "
          "FOR EACH ROW EXECUTE FUNCTION touch()",
          TRIGGER_FUNCTION + "CREATE TRIGGER transfers_touch BEFORE INSERT ON transfers "
          "FOR EACH ROW EXECUTE FUNCTION touch(); "
          "ALTER TABLE transfers DISABLE TRIGGER transfers_touch",
          ("trigger", "public.transfers.transfers_touch", "enabled", SAFE)),
    # Enum types.
    _case("enum label order", "CREATE TYPE status AS ENUM ('new', 'paid', 'void')",
          "CREATE TYPE status AS ENUM ('new', 'void', 'paid')",
          ("enum", "public.status", "labels", DESTRUCTIVE)),
    _case("enum label added", "CREATE TYPE status AS ENUM ('new', 'paid', 'void')",
          "CREATE TYPE status AS ENUM ('new', 'void')",
          ("enum", "public.status", "labels", SAFE)),
    _case("enum label removed", "CREATE TYPE status AS ENUM ('new', 'void')",
          "CREATE TYPE status AS ENUM ('new', 'paid', 'void')",
          ("enum", "public.status", "labels", DESTRUCTIVE)),
    # Domains.
    _case("domain base type", "CREATE DOMAIN cents AS bigint", "CREATE DOMAIN cents AS integer",
          ("domain", "public.cents", "base_type", WARNING)),
    _case("domain default", "CREATE DOMAIN cents AS bigint DEFAULT 0",
          "CREATE DOMAIN cents AS bigint",
          ("domain", "public.cents", "default", SAFE)),
    _case("domain not null", "CREATE DOMAIN cents AS bigint NOT NULL",
          "CREATE DOMAIN cents AS bigint", ("domain", "public.cents", "not_null", WARNING)),
    _case("domain constraint",
          "CREATE DOMAIN cents AS bigint CONSTRAINT cents_positive CHECK (VALUE > 0)",
          "CREATE DOMAIN cents AS bigint CONSTRAINT cents_positive CHECK (VALUE >= 0)",
          ("domain", "public.cents", "constraints", WARNING)),
    # Row level security policies.
    _case("policy missing", _policy(), "ALTER TABLE accounts ENABLE ROW LEVEL SECURITY",
          ("policy", "public.accounts.own_rows", "exists", SAFE)),
    _case("policy command", _policy(command="SELECT"), _policy(command="ALL"),
          ("policy", "public.accounts.own_rows", "command", SAFE)),
    _case("policy roles", _policy(role="pg_monitor"), _policy(role="PUBLIC"),
          ("policy", "public.accounts.own_rows", "roles", SAFE)),
    _case("policy expression", _policy(using="balance >= 0"), _policy(using="balance > 0"),
          ("policy", "public.accounts.own_rows", "using", SAFE)),
)


@dataclass(frozen=True)
class SnapshotFactory:
    """Snapshot maker for one database: runs base plus extra SQL, reads, then rolls back."""

    connection: psycopg.Connection[Any]

    def __call__(self, extra_sql: str) -> Schema:
        try:
            self.connection.execute(BASE_SQL)
            if extra_sql:
                self.connection.execute(extra_sql)
            return introspect(self.connection)
        finally:
            self.connection.rollback()


@dataclass(frozen=True)
class SnapshotPair:
    """Snapshot factories for the source and the target database, and the server version."""

    source: SnapshotFactory
    target: SnapshotFactory
    server_version_num: int


@pytest.fixture(scope="module")
def snapshots(pg: TestServer) -> Iterator[SnapshotPair]:
    """A source and a target database shared by every case in this module."""
    names = [pg.create_database("diffsrc"), pg.create_database("difftgt")]
    connections = [psycopg.connect(pg.dsn(name)) for name in names]
    try:
        version = connections[0].info.server_version
        yield SnapshotPair(SnapshotFactory(connections[0]), SnapshotFactory(connections[1]),
                           version)
    finally:
        for connection in connections:
            connection.close()
        for name in names:
            pg.drop_database(name)


@pytest.mark.parametrize("case", CASES, ids=[case.case_id for case in CASES])
def test_single_property_difference(snapshots: SnapshotPair, case: DiffCase) -> None:
    """Two databases differing in one property give exactly that one difference."""
    if snapshots.server_version_num < case.min_server_version_num:
        pytest.skip(f"needs server_version_num {case.min_server_version_num} or later")

    result = compare(snapshots.source(case.source_sql), snapshots.target(case.target_sql))

    found = [(d.kind, d.name, d.property, d.hazard) for d in result.differences]
    assert len(found) == 1, found
    kind, name, property_name, hazard = found[0]
    assert kind == case.kind
    assert name == case.name
    assert property_name == case.property
    assert hazard == case.hazard


def test_column_order_is_low_severity(snapshots: SnapshotPair) -> None:
    """The column order finding carries severity low, other findings normal."""
    result = compare(snapshots.source("CREATE TABLE pairs (a int, b int)"),
                     snapshots.target("CREATE TABLE pairs (b int, a int, c int)"))

    severities = {(d.kind, d.property): d.severity for d in result.differences}
    assert severities[("table", "column_order")] == "low"
    assert severities[("column", "exists")] == "normal"


def test_invalid_index_is_reported(make_database: Callable[[str], str]) -> None:
    """An index left invalid by a failed CREATE INDEX CONCURRENTLY differs in validity."""
    dsns = {side: make_database(side) for side in ("src", "tgt")}
    for side, dsn in dsns.items():
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("CREATE TABLE codes (code text); "
                               "INSERT INTO codes VALUES ('a'), ('b'), ('a')")
            if side == "src":
                connection.execute("DELETE FROM codes WHERE ctid = "
                                   "(SELECT max(ctid) FROM codes WHERE code = 'a')")
            # The duplicate on the target makes the build fail after the index exists.
            expectation = (pytest.raises(psycopg.errors.UniqueViolation) if side == "tgt"
                           else contextlib.nullcontext())
            with expectation:
                connection.execute("CREATE UNIQUE INDEX CONCURRENTLY codes_code_idx "
                                   "ON codes (code)")

    result = diff_databases(source_dsn=dsns["src"], target_dsn=dsns["tgt"])

    found = [(d.kind, d.name, d.property, d.hazard) for d in result.differences]
    assert found == [("index", "public.codes_code_idx", "valid", Hazard.WARNING)]
