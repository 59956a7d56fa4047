"""Fingerprint check: source and target ledgers compared per day and currency bucket."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from dbsync.pipeline.ledger import CheckStatus, LedgerConfig, run_ledger_checks
from dbsync.pipeline.ledger_config import parse_ledger_config
from dbsync.testing.servers import TestServer
from tests.conftest import DatabasePair
from tests.test_ledger_helpers import STYLES, make_books, new_schema_name

POSTINGS = 100_000

# 50,000 two-leg transactions over 40 days in three currencies, identical on both sides.
CREATE_LEDGER = f"""
CREATE TABLE postings (id bigint PRIMARY KEY, transaction_id bigint NOT NULL,
    amount numeric(18,2) NOT NULL, side text NOT NULL, currency char(3) NOT NULL,
    account_id integer NOT NULL, booked_at timestamptz NOT NULL);
INSERT INTO postings
SELECT g, g / 2, ((g / 2) % 9973) / 100.0 + 1, CASE WHEN g % 2 = 0 THEN 'D' ELSE 'C' END,
       (ARRAY['USD', 'EUR', 'GBP'])[(g / 2) % 3 + 1], g % 50,
       timestamptz '2026-01-01 00:00+00' + (g / 2) * interval '69 seconds'
FROM generate_series(0, {POSTINGS - 1}) AS g;
"""


def fingerprint_config() -> LedgerConfig:
    return parse_ledger_config({
        "postings": {"table": "public.postings", "style": "side",
                     "transactionId": "transaction_id", "amount": "amount", "side": "side",
                     "debitValue": "D", "creditValue": "C", "currency": "currency",
                     "account": "account_id", "bookedAt": "booked_at"},
        "checks": ["fingerprint"],
    }, origin="test configuration")


@pytest.fixture(scope="module")
def source_database(pg: TestServer) -> Iterator[str]:
    """The source ledger, loaded once per module; targets are copied from it."""
    name = pg.create_database("fp_source")
    with psycopg.connect(pg.dsn(name), autocommit=True) as connection:
        connection.execute(CREATE_LEDGER)
    yield name
    pg.drop_database(name)


@pytest.fixture
def identical_ledgers(pg: TestServer, source_database: str) -> Iterator[DatabasePair]:
    """A source ledger and a target copied from it, file by file, as a template."""
    target = f"fp_target_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg.admin_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(target), sql.Identifier(source_database)))
    yield DatabasePair(source=pg.dsn(source_database), target=pg.dsn(target))
    pg.drop_database(target)


def test_identical_ledgers_match(identical_ledgers: DatabasePair) -> None:
    """Identical source and target ledgers pass, with every posting examined."""
    result = run_ledger_checks(target_dsn=identical_ledgers.target, config=fingerprint_config(),
                               source_dsn=identical_ledgers.source)
    check = result.checks[0]
    assert check.status is CheckStatus.PASS, check.message
    assert check.rows_examined == POSTINGS


def test_fingerprint_logs_source_and_target_apart(identical_ledgers: DatabasePair,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Reading the source and comparing on the target log two distinct lines."""
    with caplog.at_level(logging.INFO, logger="dbsync.ledger"):
        run_ledger_checks(target_dsn=identical_ledgers.target, config=fingerprint_config(),
                          source_dsn=identical_ledgers.source)
    messages = [record.getMessage() for record in caplog.records
                if record.getMessage().startswith("ledger check fingerprint")]

    assert len(messages) == 2
    assert messages[0].startswith("ledger check fingerprint (reading the source): PASS")
    assert messages[1].startswith("ledger check fingerprint: PASS")


def test_one_changed_amount_names_its_bucket(identical_ledgers: DatabasePair) -> None:
    """One amount changed among 100,000 postings fails exactly its day and currency bucket."""
    with psycopg.connect(identical_ledgers.target, autocommit=True) as connection:
        row = connection.execute(
            "UPDATE postings SET amount = amount + 0.01 WHERE id = 61234 "
            "RETURNING (booked_at AT TIME ZONE 'UTC')::date::text, currency").fetchone()
    assert row is not None
    day, currency = row

    result = run_ledger_checks(target_dsn=identical_ledgers.target, config=fingerprint_config(),
                               source_dsn=identical_ledgers.source)
    check = result.checks[0]
    assert check.status is CheckStatus.FAIL
    assert check.offending_keys == (f"{day}/{currency}",)
    assert check.violations == 1


def test_swapped_values_with_equal_sums_are_found(identical_ledgers: DatabasePair) -> None:
    """Moving an amount between two accounts keeps the sums but changes the row hash."""
    with psycopg.connect(identical_ledgers.target, autocommit=True) as connection:
        connection.execute("UPDATE postings SET account_id = account_id + 1 WHERE id = 500")
    result = run_ledger_checks(target_dsn=identical_ledgers.target, config=fingerprint_config(),
                               source_dsn=identical_ledgers.source)
    assert result.checks[0].status is CheckStatus.FAIL
    assert result.checks[0].violations == 1


def test_wider_numeric_type_on_target_still_matches(identical_ledgers: DatabasePair) -> None:
    """numeric(20,4) on the target matches numeric(18,2) on the source with equal values."""
    with psycopg.connect(identical_ledgers.target, autocommit=True) as connection:
        connection.execute("ALTER TABLE postings ALTER COLUMN amount TYPE numeric(20,4)")
    result = run_ledger_checks(target_dsn=identical_ledgers.target, config=fingerprint_config(),
                               source_dsn=identical_ledgers.source)
    assert result.checks[0].status is CheckStatus.PASS, result.checks[0].message


@pytest.mark.parametrize("style", STYLES)
def test_fingerprint_in_each_style(db_pair: DatabasePair, style: str) -> None:
    """Equal books match in each ledger style, and one changed leg fails its bucket."""
    schema = new_schema_name()
    source = make_books(db_pair.source, style, schema=schema)
    target = make_books(db_pair.target, style, schema=schema)
    config = target.config(checks=["fingerprint"])

    passing = run_ledger_checks(target_dsn=target.dsn, config=config, source_dsn=source.dsn)
    assert passing.checks[0].status is CheckStatus.PASS, passing.checks[0].message

    target.add_transaction(3, [(1, "EUR", "1.00"), (2, "EUR", "-1.00")])
    failing = run_ledger_checks(target_dsn=target.dsn, config=config, source_dsn=source.dsn)
    assert failing.checks[0].status is CheckStatus.FAIL
    assert failing.checks[0].offending_keys == ("2026-01-05/EUR",)
