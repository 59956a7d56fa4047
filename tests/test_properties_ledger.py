"""Property-based tests of the ledger configuration and of how its identifiers reach SQL.

Generated configurations round-trip through the model and pass the CRD schema of
``spec.ledger``; out-of-range values are rejected with the field named. Identifiers drawn
from quotes, semicolons, comment markers, spaces and non-ASCII letters name real tables and
columns on PostgreSQL, and the checks must find and read them (PASS) while a sentinel table
survives: an identifier that reached SQL unquoted would fail to parse or run as SQL.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from dbsync.k8s.crd import build_crd
from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.ledger import CheckStatus, run_ledger_checks
from dbsync.pipeline.ledger_config import LedgerConfig, parse_ledger_config
from dbsync.testing.kubeapi.schema import prepare
from dbsync.testing.servers import TestServer

SCHEMA: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
MODEL_SETTINGS = settings(max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
DATABASE_SETTINGS = settings(max_examples=12, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.function_scoped_fixture])

_PLAIN = st.from_regex(r"\A[a-z_][a-z0-9_]{0,30}\Z")
# Characters that break SQL when an identifier is pasted in unquoted.
_HOSTILE = st.text(alphabet=st.sampled_from(list("ab_;'\"-/*() .$\\é€")), min_size=1,
                   max_size=24).filter(lambda text: len(text.encode("utf-8")) <= 63)


def _signed_config() -> st.SearchStrategy[dict[str, Any]]:
    # A ledger names its currency column or fixes one currency, never both.
    currency = st.one_of(st.builds(lambda name: {"currency": name}, _PLAIN),
                         st.builds(lambda code: {"fixedCurrency": code},
                                   st.from_regex(r"\A[A-Z]{3}\Z")))
    postings = st.builds(lambda base, chosen: {**base, **chosen}, st.fixed_dictionaries(
        {"table": _PLAIN, "style": st.just("signed"), "transactionId": _PLAIN,
         "amount": _PLAIN},
        optional={"account": _PLAIN, "bookedAt": _PLAIN,
                  "debitSign": st.sampled_from(["positive", "negative"])}), currency)
    return st.fixed_dictionaries(
        {"postings": postings},
        optional={
            "minorUnits": st.dictionaries(st.from_regex(r"\A[A-Z]{3}\Z"), st.integers(0, 18),
                                          max_size=3),
            "defaultMinorUnits": st.integers(0, 18),
            "statementTimeoutMs": st.integers(1, 10**9),
            "maxOffendingKeys": st.integers(0, 10_000),
            "checks": st.sampled_from([["transaction_balance"], ["trial_balance"],
                                       ["transaction_balance", "minimum_legs"]]),
        })


def _schema_errors(ledger: dict[str, Any]) -> list[str]:
    reference = {"uriFrom": {"secretKeyRef": {"name": "db", "key": "uri"}}}
    resource = {"apiVersion": "dbsync.io/v1alpha1", "kind": "DatabaseSync",
                "metadata": {"name": "generated"},
                "spec": {"source": reference, "target": reference,
                         "ledger": copy.deepcopy(ledger)}}
    _, errors = prepare(resource, SCHEMA)
    return [str(error) for error in errors]


@MODEL_SETTINGS
@given(ledger=_signed_config())
def test_ledger_config_round_trips_and_passes_schema(ledger: dict[str, Any]) -> None:
    """A generated configuration parses, dumps by alias, parses equal, and fits the CRD."""
    config = parse_ledger_config(ledger, origin="generated")
    dumped = config.model_dump(mode="json", by_alias=True, exclude_none=True)

    assert parse_ledger_config(dumped, origin="dumped") == config
    assert _schema_errors(ledger) == []


OUT_OF_RANGE = {
    "defaultMinorUnits": st.one_of(st.integers(max_value=-1), st.integers(min_value=19)),
    "statementTimeoutMs": st.integers(max_value=0),
    "maxOffendingKeys": st.one_of(st.integers(max_value=-1), st.integers(min_value=10_001)),
}


@MODEL_SETTINGS
@given(ledger=_signed_config(), data=st.data())
def test_out_of_range_ledger_value_names_field(ledger: dict[str, Any],
                                               data: st.DataObject) -> None:
    """An out-of-range number is rejected by the model and the schema, naming the field."""
    field = data.draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    ledger = {**ledger, field: data.draw(OUT_OF_RANGE[field])}

    with pytest.raises(ConfigurationError) as raised:
        parse_ledger_config(ledger, origin="generated")
    errors = _schema_errors(ledger)

    assert field in str(raised.value)
    assert any(error.startswith(f"spec.ledger.{field}:") for error in errors), errors


@MODEL_SETTINGS
@given(ledger=_signed_config(), key=st.from_regex(r"\A[a-z][a-zA-Z]{2,12}\Z"))
def test_unknown_ledger_key_names_it(ledger: dict[str, Any], key: str) -> None:
    """A key the model does not know is rejected with the key in the message."""
    if key in LedgerConfig.model_fields or key in {
            field.alias for field in LedgerConfig.model_fields.values()}:
        return
    with pytest.raises(ConfigurationError) as raised:
        parse_ledger_config({**ledger, key: 1}, origin="generated")

    assert key in str(raised.value)


@pytest.fixture(scope="module")
def ledger_database(pg: TestServer) -> Iterator[str]:
    """A database with a sentinel table, for the identifier properties."""
    name = pg.create_database("ledgerprop")
    dsn = pg.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE sentinel (id integer)")
        connection.execute("INSERT INTO sentinel VALUES (1)")
        connection.execute("CREATE SCHEMA books")
    yield dsn
    pg.drop_database(name)


def _create_books(dsn: str, *, table: str, columns: dict[str, str]) -> Callable[[], None]:
    """Create ``books.<table>`` with balanced postings and return its dropper."""
    identifier = sql.Identifier("books", table)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(identifier))
        connection.execute(sql.SQL("CREATE TABLE {} ({} bigint, {} numeric, {} text)").format(
            identifier, sql.Identifier(columns["transactionId"]),
            sql.Identifier(columns["amount"]), sql.Identifier(columns["currency"])))
        connection.execute(sql.SQL("INSERT INTO {} VALUES (1, 10.00, 'EUR'), (1, -10.00, 'EUR'), "
                                   "(2, 5.50, 'USD'), (2, -5.50, 'USD')").format(identifier))

    def drop() -> None:
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(identifier))

    return drop


@DATABASE_SETTINGS
@given(table=_HOSTILE, names=st.lists(_HOSTILE, min_size=3, max_size=3, unique=True))
def test_hostile_identifiers_are_quoted_in_sql(ledger_database: str, table: str,
                                               names: list[str]) -> None:
    """Tables and columns named with quotes, semicolons and comment markers are read as names."""
    columns = dict(zip(("transactionId", "amount", "currency"), names, strict=True))
    drop = _create_books(ledger_database, table=table, columns=columns)
    try:
        config = parse_ledger_config(
            {"postings": {"table": f"books.{table}", "style": "signed", **columns},
             "checks": ["transaction_balance", "trial_balance", "mixed_currency"]},
            origin="generated")
        result = run_ledger_checks(target_dsn=ledger_database, config=config)
    finally:
        drop()
    with psycopg.connect(ledger_database) as connection:
        sentinel = connection.execute("SELECT count(*) FROM sentinel").fetchone()

    assert [check.status for check in result.checks] == [CheckStatus.PASS] * 3, [
        (check.name, check.message) for check in result.checks]
    assert sentinel == (1,)
