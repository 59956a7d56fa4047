"""The shared per-transaction pass, split into parallel transaction ranges, on real PostgreSQL.

The split only changes how PostgreSQL schedules the grouping, so every count and key must
match what each check finds on its own with one unsplit query.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from psycopg import sql

from dbsync.pipeline.ledger import CheckName, CheckResult, CheckStatus, run_ledger_checks
from dbsync.pipeline.ledger_checks import (
    CheckOutcome,
    Connection,
    TransactionSummary,
    check_minimum_legs,
    check_mixed_currency,
    check_orphans,
    check_transaction_balance,
    summarize_transactions,
    transaction_ranges,
)
from dbsync.pipeline.ledger_sql import LedgerSchema, resolve_ledger
from tests.test_ledger_helpers import STYLES, LedgerBooks, ledger_dsn, make_books

__all__ = ["ledger_dsn"]

TRANSACTION_COLUMN = {"side": "transaction_id", "signed": "txn_id",
                      "debit_credit_columns": "move_id"}

SummaryCheck = Callable[..., CheckOutcome]
SUMMARY_CHECKS: tuple[SummaryCheck, ...] = (check_transaction_balance, check_minimum_legs,
                                            check_mixed_currency, check_orphans)


def index_transactions(books: LedgerBooks) -> None:
    """Create the index the range split needs: one leading with the transaction id."""
    books.execute(sql.SQL("CREATE INDEX ON {}.{} ({})").format(
        sql.Identifier(books.schema), sql.Identifier(books.postings_table),
        sql.Identifier(TRANSACTION_COLUMN[books.style])))


def break_every_grouped_check(books: LedgerBooks) -> None:
    """Add one violation of each per-transaction check, spread over the id range."""
    books.add_transaction(3, [(1, "USD", "10.00"), (2, "USD", "-9.99")])
    books.add_transaction(40, [(1, "USD", "10.00")])
    books.add_transaction(41, [(1, "USD", "10.00"), (4, "EUR", "-10.00")])
    books.add_transaction(77, [(1, "USD", "3.00"), (2, None, "-3.00")])
    books.add_transaction(90, [(1, "USD", "1.00"), (2, "USD", "-1.00")], header=False)
    books.add_transaction(200, [(1, "USD", None), (2, "USD", None)])
    # Legs without a transaction id fall outside every range and form their own group.
    books.insert_leg(None, 1, "USD", "5.00")


def outcomes(schema: LedgerSchema, connection: Connection,
             summary: TransactionSummary | None) -> list[tuple[object, ...]]:
    found = []
    for check in SUMMARY_CHECKS:
        outcome = check(schema, connection, limit=10, summary=summary)
        found.append((check.__name__, outcome.rows_examined, outcome.violations,
                      outcome.offending_keys))
    return found


@pytest.mark.parametrize("style", STYLES)
def test_split_pass_matches_single_checks(ledger_dsn: str, style: str) -> None:
    """Counts and keys from the split pass equal those of each check's own query."""
    books = make_books(ledger_dsn, style)
    break_every_grouped_check(books)
    index_transactions(books)

    with psycopg.connect(books.dsn, autocommit=True) as connection:
        schema = resolve_ledger(connection, books.config())
        alone = outcomes(schema, connection, None)

        connection.execute("SET max_parallel_workers_per_gather = 3")
        ranges = transaction_ranges(schema, connection)
        split = summarize_transactions(schema, connection, with_headers=True,
                                       with_currency_totals=True)
        together = outcomes(schema, connection, split)

        connection.execute("SET max_parallel_workers_per_gather = 0")
        unsplit = summarize_transactions(schema, connection, with_headers=True,
                                         with_currency_totals=True)

    assert len(ranges) == 4
    assert split == unsplit
    assert together == alone
    assert split.headerless_legs == 2
    assert all(violations for _, _, violations, _ in together), together


def test_ranges_cover_every_id(ledger_dsn: str) -> None:
    """The first and last ranges are open, and each range starts where the last one stopped."""
    books = make_books(ledger_dsn, "side")
    with books.batch():
        for transaction_id in range(10, 60):
            books.add_transaction(transaction_id, [(1, "USD", "1.00"), (2, "USD", "-1.00")])
    index_transactions(books)

    with psycopg.connect(books.dsn, autocommit=True) as connection:
        schema = resolve_ledger(connection, books.config())
        connection.execute("SET max_parallel_workers_per_gather = 2")
        ranges = transaction_ranges(schema, connection)

    assert ranges[0][0] is None
    assert ranges[-1][1] is None
    assert [stop for _, stop in ranges[:-1]] == [start for start, _ in ranges[1:]]
    assert len(ranges) == 3


def test_no_split_without_transaction_index(ledger_dsn: str) -> None:
    """Without an index each range would scan the whole table, so the pass stays whole."""
    books = make_books(ledger_dsn, "side")
    with psycopg.connect(books.dsn, autocommit=True) as connection:
        schema = resolve_ledger(connection, books.config())
        connection.execute("SET max_parallel_workers_per_gather = 4")
        assert transaction_ranges(schema, connection) == ((None, None),)


def test_orphans_same_with_shared_pass(ledger_dsn: str) -> None:
    """Orphans reports the same postings whether the shared pass looked up the headers."""
    books = make_books(ledger_dsn, "side")
    books.add_transaction(90, [(1, "USD", "1.00"), (2, "USD", "-1.00")], header=False)
    books.add_transaction(91, [(1, "USD", "1.00"), (999, "USD", "-1.00")])

    def run(checks: list[str]) -> tuple[object, ...]:
        result = run_ledger_checks(target_dsn=books.dsn, config=books.config(checks=checks))
        orphans = next(check for check in result.checks if check.name is CheckName.ORPHANS)
        return orphans.status, orphans.violations, orphans.offending_keys

    assert run(["orphans"]) == run(["orphans", "minimum_legs"]) == (
        CheckStatus.FAIL, 3, ("90", "91"))


def test_unknown_account_fails_shared_orphans(ledger_dsn: str) -> None:
    """Headers all present is not enough: an unknown account still fails orphans."""
    books = make_books(ledger_dsn, "side")
    books.add_transaction(91, [(1, "USD", "1.00"), (999, "USD", "-1.00")])
    result = run_ledger_checks(target_dsn=books.dsn,
                               config=books.config(checks=["transaction_balance", "orphans"]))
    orphans = result.checks[1]
    assert (orphans.status, orphans.violations, orphans.offending_keys) == (
        CheckStatus.FAIL, 1, ("91",))


@pytest.mark.parametrize(("amount_type", "amount", "broken"), [
    ("numeric", "1.500", False),
    ("numeric", "1.505", True),
    ("numeric(18,4)", "2.0100", False),
    ("numeric(18,4)", "2.0101", True),
    ("numeric(18,2)", "2.01", False),
])
def test_extra_decimals_exact_per_scale(
        ledger_dsn: str, amount_type: str, amount: str, broken: bool) -> None:
    """Trailing zeros are no extra decimals; a real third decimal is one."""
    books = make_books(ledger_dsn, "side", amount_type=amount_type)
    books.add_transaction(5, [(1, "USD", amount), (2, "USD", f"-{amount}")])
    result = run_ledger_checks(target_dsn=books.dsn,
                               config=books.config(checks=["field_sanity"]))
    sanity = result.checks[0]
    assert (sanity.status is CheckStatus.FAIL) is broken, sanity.message
    if broken:
        assert sanity.violations == 2
        assert "more decimals than the currency allows in amount" in sanity.message


def trial_balance_of(books: LedgerBooks, checks: list[str]) -> CheckResult:
    result = run_ledger_checks(target_dsn=books.dsn, config=books.config(checks=checks))
    return next(check for check in result.checks if check.name is CheckName.TRIAL_BALANCE)


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "single-currency"])
@pytest.mark.parametrize("style", STYLES)
def test_shared_trial_balance_matches_own_query(
        ledger_dsn: str, style: str, mixed: bool) -> None:
    """Currency totals taken from the shared pass match trial_balance's own scan."""
    books = make_books(ledger_dsn, style)
    books.add_transaction(3, [(1, "USD", "10.00"), (2, "USD", "-9.99")])
    books.add_transaction(8, [(1, "GBP", "7.00"), (2, "GBP", None)])
    books.add_transaction(9, [(1, None, "2.00"), (2, None, "-2.00")])
    if mixed:
        books.add_transaction(41, [(1, "USD", "10.00"), (4, "EUR", "-10.00")])
    index_transactions(books)

    alone = trial_balance_of(books, ["trial_balance"])
    shared = trial_balance_of(books, ["transaction_balance", "trial_balance"])

    assert (shared.status, shared.violations, shared.offending_keys, shared.rows_examined,
            shared.details) == (alone.status, alone.violations, alone.offending_keys,
                                alone.rows_examined, alone.details)
    assert alone.offending_keys == (("EUR", "GBP", "USD") if mixed else ("GBP", "USD"))
    # A transaction in two currencies cannot be totalled per transaction, so the check
    # falls back to its own scan, and its message lacks the shared-pass note.
    assert ("shared by the per-transaction checks" in shared.message) is not mixed


def test_timed_out_pass_falls_back(ledger_dsn: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass past its statement timeout is not retried; each check runs its own query."""
    books = make_books(ledger_dsn, "side")
    books.add_transaction(3, [(1, "USD", "10.00"), (2, "USD", "-9.99")])
    calls: list[int] = []

    def slow_pass(schema: LedgerSchema, connection: Connection,
                  **options: object) -> TransactionSummary:
        # A real query that outlasts statementTimeoutMs, in place of a pass over big books.
        calls.append(1)
        connection.execute("SELECT pg_sleep(5)")
        raise AssertionError("statement_timeout did not cancel the query")

    monkeypatch.setattr("dbsync.pipeline.ledger.summarize_transactions", slow_pass)
    result = run_ledger_checks(target_dsn=books.dsn,
                               config=books.config(statementTimeoutMs=300))
    statuses = {check.name: check.status for check in result.checks}

    assert len(calls) == 1
    assert CheckStatus.TIMEOUT not in statuses.values(), result.render_text()
    assert statuses[CheckName.TRANSACTION_BALANCE] is CheckStatus.FAIL
    assert statuses[CheckName.TRIAL_BALANCE] is CheckStatus.FAIL
    assert statuses[CheckName.MINIMUM_LEGS] is CheckStatus.PASS
    assert statuses[CheckName.ORPHANS] is CheckStatus.PASS
