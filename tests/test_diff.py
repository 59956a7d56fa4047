"""Schema diff on real databases: identical schemas, drift, identity matching and ignore rules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbsync.pipeline.diff import (
    DiffOptions,
    DiffResult,
    Hazard,
    compare,
    diff_databases,
    introspect,
)
from dbsync.pipeline.errors import ConfigurationError, ConnectionFailedError
from dbsync.testing.servers import TestServer
from tests.conftest import DatabasePair

# Mixed-case and reserved-word names, session-dependent literals and a non-public schema.
SCRIPT = """
SET search_path = "Billing", public;
SET TimeZone = 'America/New_York';
CREATE SCHEMA "Billing";
CREATE TYPE "Billing"."Status" AS ENUM ('new', 'Paid', 'void, late');
CREATE DOMAIN "Billing".cents AS bigint DEFAULT 0 NOT NULL CHECK (VALUE >= 0);
CREATE TABLE "Billing"."Order" (
    "select" int GENERATED ALWAYS AS IDENTITY (START WITH 10) PRIMARY KEY,
    "User" text COLLATE "C" NOT NULL,
    "from" timestamptz NOT NULL DEFAULT '2024-03-10 02:30:00',
    "Total" numeric(12,2) DEFAULT 1.5 CHECK ("Total" > 0.1),
    status "Status" NOT NULL DEFAULT 'new',
    amount cents,
    ratio double precision DEFAULT 0.1,
    due interval DEFAULT '1 day 02:00:00',
    tags text[][],
    doubled numeric GENERATED ALWAYS AS ("Total" * 2) STORED,
    UNIQUE ("User", "from")
);
COMMENT ON TABLE "Billing"."Order" IS 'orders';
COMMENT ON COLUMN "Billing"."Order"."User" IS 'who ordered';
CREATE TABLE "Billing".line (
    id serial PRIMARY KEY,
    order_id int REFERENCES "Order" ("select") ON DELETE CASCADE DEFERRABLE,
    placed date DEFAULT '2024-01-31'
) PARTITION BY RANGE (id);
CREATE TABLE "Billing".line_low PARTITION OF "Billing".line FOR VALUES FROM (0) TO (1000);
CREATE INDEX "Order_lower_idx" ON "Order" (lower("User") text_pattern_ops)
    WHERE "from" > '2024-01-01';
CREATE INDEX ON "Billing".line (order_id);
CREATE VIEW "Billing"."Recent" AS
    SELECT "select", "from" FROM "Order" WHERE "from" > '2024-06-01 12:00';
CREATE MATERIALIZED VIEW "Billing".totals AS SELECT sum("Total") AS total FROM "Order";
CREATE FUNCTION "Billing"."Fee"(amount numeric, "when" timestamptz DEFAULT '2024-01-01')
    RETURNS numeric LANGUAGE sql STABLE AS 'SELECT amount * 0.01';
CREATE FUNCTION "Billing".touch() RETURNS trigger LANGUAGE plpgsql
    AS 'BEGIN RETURN NEW; END';
CREATE TRIGGER "Touch" BEFORE UPDATE ON "Order" FOR EACH ROW EXECUTE FUNCTION touch();
CREATE PROCEDURE "Billing".settle(days int) LANGUAGE sql
    BEGIN ATOMIC SELECT now() - make_interval(days => days); END;
ALTER TABLE "Order" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Own" ON "Order" FOR SELECT USING ("User" = current_user);
CREATE SEQUENCE "Billing".invoice_numbers AS integer INCREMENT BY 5 CYCLE;
CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY);
"""

DRIFT_BASE = """
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(12,2));
CREATE INDEX accounts_owner_idx ON accounts (owner);
"""
DRIFT = """
ALTER TABLE accounts ADD COLUMN nickname text;
ALTER TABLE accounts ALTER COLUMN balance TYPE numeric(10,2);
DROP INDEX accounts_owner_idx;
"""


def run_sql(dsn: str, script: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(script)


def build_pair(pair: DatabasePair, *, source_sql: str, target_sql: str) -> None:
    run_sql(pair.source, source_sql)
    run_sql(pair.target, target_sql)


@contextmanager
def built_pair(pg: TestServer, *, source_sql: str, target_sql: str) -> Iterator[DatabasePair]:
    """Create a source and a target database from two scripts, dropping both afterwards."""
    names = [pg.create_database("src"), pg.create_database("tgt")]
    try:
        pair = DatabasePair(source=pg.dsn(names[0]), target=pg.dsn(names[1]))
        build_pair(pair, source_sql=source_sql, target_sql=target_sql)
        yield pair
    finally:
        for name in names:
            pg.drop_database(name)


@pytest.fixture(scope="module")
def script_pair(pg: TestServer) -> Iterator[DatabasePair]:
    """Two databases built from the same script (shared: tests only read them)."""
    with built_pair(pg, source_sql=SCRIPT, target_sql=SCRIPT) as pair:
        yield pair


@pytest.fixture(scope="module")
def drift_result(pg: TestServer) -> Iterator[DiffResult]:
    """The diff of a source with a target that has an extra column, a changed type and a
    missing index."""
    with built_pair(pg, source_sql=DRIFT_BASE, target_sql=DRIFT_BASE + DRIFT) as pair:
        yield diff_databases(source_dsn=pair.source, target_dsn=pair.target)


def summarize(differences: object) -> list[tuple[str, str, str]]:
    assert isinstance(differences, tuple)
    return [(d.kind, d.name, d.property) for d in differences]


def test_identical_databases_have_no_differences(script_pair: DatabasePair) -> None:
    """Two databases built from one script compare equal."""
    result = diff_databases(source_dsn=script_pair.source, target_dsn=script_pair.target)

    assert summarize(result.differences) == []
    assert result.in_sync


def test_identical_databases_counted_on_both_sides(script_pair: DatabasePair) -> None:
    """The summary counts every kind of object on each side, partitions' columns included."""
    summary = diff_databases(source_dsn=script_pair.source,
                             target_dsn=script_pair.target).summary

    assert summary["tables"] == {"source": 4, "target": 4}
    assert summary["columns"] == {"source": 17, "target": 17}
    assert summary["enums"] == {"source": 1, "target": 1}
    assert summary["policies"] == {"source": 1, "target": 1}


def test_session_settings_do_not_change_snapshot(script_pair: DatabasePair) -> None:
    """Sessions with different search_path, TimeZone and DateStyle read equal schemas."""
    database = conninfo_to_dict(script_pair.target)["dbname"]
    run_sql(script_pair.target,
            f'ALTER DATABASE "{database}" SET search_path = "Billing", public')
    source_dsn = make_conninfo(
        script_pair.source,
        options="-c search_path=public,\"Billing\" -c TimeZone=Asia/Kolkata "
                "-c DateStyle=SQL,DMY -c extra_float_digits=0 -c IntervalStyle=sql_standard")
    target_dsn = make_conninfo(script_pair.target, options="-c TimeZone=Pacific/Chatham")

    result = diff_databases(source_dsn=source_dsn, target_dsn=target_dsn)

    assert summarize(result.differences) == []


def test_introspect_restores_session(script_pair: DatabasePair) -> None:
    """introspect leaves the caller's settings and transaction state as they were."""
    with psycopg.connect(script_pair.source) as connection:
        connection.execute("SET search_path = \"Billing\"; SET TimeZone = 'Asia/Tokyo'")
        connection.commit()

        introspect(connection)

        settings = connection.execute(
            "SELECT current_setting('search_path'), current_setting('TimeZone')").fetchone()
        assert settings == ('"Billing"', "Asia/Tokyo")
        assert connection.isolation_level is None
        assert connection.read_only is None


def test_introspect_on_autocommit_connection(script_pair: DatabasePair) -> None:
    """An autocommit connection reads the same snapshot as a transactional one."""
    with psycopg.connect(script_pair.source, autocommit=True) as autocommit_connection:
        from_autocommit = introspect(autocommit_connection)
    with psycopg.connect(script_pair.source) as connection:
        from_transaction = introspect(connection)

    assert summarize(compare(from_autocommit, from_transaction).differences) == []


def test_drifted_target_reports_three_differences(drift_result: DiffResult) -> None:
    """An extra column, a changed type and a missing index give exactly three differences."""
    found = [(d.kind, d.name, d.property, d.source, d.target, d.hazard)
             for d in drift_result.differences]
    assert sorted(found) == sorted([
        ("column", "public.accounts.nickname", "exists", "absent", "present",
         Hazard.DESTRUCTIVE),
        ("column", "public.accounts.balance", "type", "numeric(12,2)", "numeric(10,2)",
         Hazard.SAFE),
        ("index", "public.accounts_owner_idx", "exists", "present", "absent", Hazard.WARNING),
    ])


def test_drift_result_as_json(drift_result: DiffResult) -> None:
    """to_dict gives a JSON-safe summary and differences with every documented key."""
    document = json.loads(json.dumps(drift_result.to_dict()))

    assert document["summary"]["columns"] == {"source": 3, "target": 4}
    assert document["summary"]["indexes"] == {"source": 1, "target": 0}
    assert len(document["differences"]) == 3
    assert set(document["differences"][0]) == {
        "kind", "name", "property", "source", "target", "hazard", "severity"}


def test_drift_result_as_text(drift_result: DiffResult) -> None:
    """render_text lists the counts and one line per difference."""
    text = drift_result.render_text()

    assert text.startswith("Schema diff: 3 differences")
    assert "index public.accounts_owner_idx: missing in target" in text
    assert "column public.accounts.nickname: only in target" in text
    assert ("column public.accounts.balance type: source numeric(12,2), target numeric(10,2)"
            in text)


def test_counts_by_kind(drift_result: DiffResult) -> None:
    """counts_by_kind tallies differences per object kind."""
    assert drift_result.counts_by_kind() == {"column": 2, "index": 1}


IDENTITY_SOURCE = """
CREATE TABLE journal (id serial, body text);
CREATE TABLE bookings (during tsrange,
    CONSTRAINT bookings_during EXCLUDE USING gist (during WITH &&));
CREATE TABLE payments (id int PRIMARY KEY);
CREATE FUNCTION fee(amount int) RETURNS int LANGUAGE sql AS 'SELECT amount';
"""
IDENTITY_TARGET = """
CREATE TABLE journal (id int GENERATED BY DEFAULT AS IDENTITY, body text);
CREATE TABLE bookings (during tsrange);
CREATE INDEX bookings_during ON bookings USING gist (during);
CREATE TABLE payouts (id int PRIMARY KEY);
CREATE FUNCTION fee(amount bigint) RETURNS int LANGUAGE sql AS 'SELECT 1';
"""


@pytest.fixture(scope="module")
def identity_result(pg: TestServer) -> Iterator[list[tuple[str, str, str, str | None]]]:
    """(kind, name, property, target value) of each difference between objects that share
    a name but not an identity."""
    with built_pair(pg, source_sql=IDENTITY_SOURCE, target_sql=IDENTITY_TARGET) as pair:
        result = diff_databases(source_dsn=pair.source, target_dsn=pair.target)
        yield [(d.kind, d.name, d.property, d.target) for d in result.differences]


def test_serial_and_identity_not_equal(
        identity_result: list[tuple[str, str, str, str | None]]) -> None:
    """A serial's sequence and an identity's internal sequence are different objects."""
    found = [item[:3] for item in identity_result if "journal" in item[1]]

    assert found == [("sequence", "public.journal_id_seq", "exists"),
                     ("column", "public.journal.id", "default"),
                     ("column", "public.journal.id", "identity")]


def test_exclusion_constraint_and_index_not_equal(
        identity_result: list[tuple[str, str, str, str | None]]) -> None:
    """An exclusion constraint and a plain index with the same name are not equal."""
    found = [item for item in identity_result if "bookings" in item[1]]

    assert found == [("constraint", "public.bookings.bookings_during", "exists", "absent"),
                     ("index", "public.bookings_during", "exists", "present")]


def test_renamed_table_is_removed_and_added(
        identity_result: list[tuple[str, str, str, str | None]]) -> None:
    """A renamed table reads as one table missing and one table extra."""
    found = [item for item in identity_result if "pay" in item[1]]

    assert found == [("table", "public.payments", "exists", "absent"),
                     ("table", "public.payouts", "exists", "present")]


def test_function_signature_is_identity(
        identity_result: list[tuple[str, str, str, str | None]]) -> None:
    """Functions with the same name and other argument types are different objects."""
    found = [item for item in identity_result if item[0] == "function"]

    assert found == [("function", "public.fee(amount bigint)", "exists", "present"),
                     ("function", "public.fee(amount integer)", "exists", "absent")]


DBSYNC_OBJECTS = """
CREATE TABLE sync_audit_logs (id bigserial PRIMARY KEY, event text);
CREATE INDEX sync_audit_logs_event_idx ON sync_audit_logs (event);
CREATE VIEW sync_audit_operations AS SELECT id FROM sync_audit_logs;
CREATE TABLE dbsync_alembic_version (version_num varchar(32) PRIMARY KEY);
CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);
"""


@pytest.fixture(scope="module")
def dbsync_objects_pair(pg: TestServer) -> Iterator[DatabasePair]:
    """An empty source and a target holding dbsync's own objects."""
    with built_pair(pg, source_sql="SELECT 1", target_sql=DBSYNC_OBJECTS) as pair:
        yield pair


def test_dbsync_objects_ignored_by_default(dbsync_objects_pair: DatabasePair) -> None:
    """dbsync's audit table, view and dbsync_* tables are left out, but not alembic_version."""
    result = diff_databases(source_dsn=dbsync_objects_pair.source,
                            target_dsn=dbsync_objects_pair.target)

    assert summarize(result.differences) == [("table", "public.alembic_version", "exists")]


def test_dbsync_objects_included_on_request(dbsync_objects_pair: DatabasePair) -> None:
    """include_dbsync_objects compares dbsync's own objects too."""
    result = diff_databases(source_dsn=dbsync_objects_pair.source,
                            target_dsn=dbsync_objects_pair.target,
                            options=DiffOptions(include_dbsync_objects=True))

    # The sequence and index of the missing audit table are covered by the table itself.
    names = {d.name for d in result.differences}
    assert names == {"public.sync_audit_logs", "public.sync_audit_operations",
                     "public.dbsync_alembic_version", "public.alembic_version"}


IGNORE_SOURCE = "CREATE TABLE accounts (id int)"
IGNORE_TARGET = """
CREATE SCHEMA scratch;
CREATE TABLE scratch.notes (id int);
CREATE TABLE tmp_import (id int);
CREATE INDEX tmp_import_id_idx ON tmp_import (id);
CREATE TABLE accounts (id int, extra int);
CREATE INDEX accounts_id_idx ON accounts (id);
CREATE VIEW account_ids AS SELECT id FROM accounts;
"""


@pytest.fixture(scope="module")
def ignore_pair(pg: TestServer) -> Iterator[DatabasePair]:
    """A source with one table and a target with extra schema, tables, index and view."""
    with built_pair(pg, source_sql=IGNORE_SOURCE, target_sql=IGNORE_TARGET) as pair:
        yield pair


@pytest.mark.parametrize(("options", "expected"), [
    (DiffOptions(), {"scratch", "scratch.notes", "public.tmp_import", "public.accounts.extra",
                     "public.accounts_id_idx", "public.account_ids"}),
    (DiffOptions(ignore_schemas=("scratch",)),
     {"public.tmp_import", "public.accounts.extra", "public.accounts_id_idx",
      "public.account_ids"}),
    (DiffOptions(ignore_patterns=("public.tmp_*", "public.accounts")),
     {"scratch", "scratch.notes", "public.account_ids"}),
    (DiffOptions(ignore_patterns=("*.extra",)),
     {"scratch", "scratch.notes", "public.tmp_import", "public.accounts_id_idx",
      "public.account_ids"}),
    (DiffOptions(ignore_kinds=("view", "index")),
     {"scratch", "scratch.notes", "public.tmp_import", "public.accounts.extra"}),
], ids=["none", "schema", "table glob", "column glob", "kinds"])
def test_ignore_rules(ignore_pair: DatabasePair, options: DiffOptions,
                      expected: set[str]) -> None:
    """Ignored schemas, name globs and kinds leave out the matching objects and their parts."""
    result = diff_databases(source_dsn=ignore_pair.source, target_dsn=ignore_pair.target,
                            options=options)

    assert {d.name for d in result.differences} == expected


def test_ignored_kind_column_order(pg: TestServer) -> None:
    """ignore_kinds column_order drops the column order finding only."""
    with built_pair(pg, source_sql="CREATE TABLE pairs (a int, b int)",
                    target_sql="CREATE TABLE pairs (b int, a int)") as pair:
        result = diff_databases(source_dsn=pair.source, target_dsn=pair.target,
                                options=DiffOptions(ignore_kinds=("column_order",)))

    assert result.in_sync


def test_options_reject_unknown_kind() -> None:
    """An unknown kind to ignore raises a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="tablez"):
        DiffOptions(ignore_kinds=("tablez",))


def test_unreachable_target_raises_redacted_error(script_pair: DatabasePair) -> None:
    """A failed connection raises ConnectionFailedError without the password in the message."""
    # A missing database fails under any authentication method, trust included.
    target = make_conninfo(script_pair.target, dbname="missing_diff_database",
                           password="not-the-password-42")

    with pytest.raises(ConnectionFailedError) as raised:
        diff_databases(source_dsn=script_pair.source, target_dsn=target,
                       options=DiffOptions(connect_timeout_seconds=5))

    assert "not-the-password-42" not in str(raised.value)
    assert "target" in str(raised.value)
