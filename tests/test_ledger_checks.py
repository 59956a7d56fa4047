"""Ledger checks on real PostgreSQL: each check passes on balanced books and fails on broken ones.

Every check is run against each of the three ledger styles (side column, signed amounts,
separate debit and credit columns).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from psycopg import sql

from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.ledger import (
    CheckName,
    CheckResult,
    CheckStatus,
    LedgerResult,
    run_ledger_checks,
)
from tests.test_ledger_helpers import STYLES, LedgerBooks, ledger_dsn, make_books

__all__ = ["ledger_dsn"]

TARGET_CHECKS = [name for name in CheckName if name is not CheckName.FINGERPRINT]


def run_one(books: LedgerBooks, check: CheckName) -> CheckResult:
    result = run_ledger_checks(target_dsn=books.dsn, config=books.config(checks=[check.value]))
    assert len(result.checks) == 1
    return result.checks[0]


def break_transaction_balance(books: LedgerBooks) -> None:
    books.add_transaction(3, [(1, "USD", "10.00"), (2, "USD", "-9.99")])


def break_minimum_legs(books: LedgerBooks) -> None:
    books.add_transaction(4, [(1, "USD", "10.00")])


def break_stored_balances(books: LedgerBooks) -> None:
    books.execute(sql.SQL("UPDATE {}.accounts SET balance = balance + 0.01 WHERE id = 3").format(
        sql.Identifier(books.schema)))


def break_field_sanity(books: LedgerBooks) -> None:
    books.add_transaction(5, [(1, "USD", None), (2, "USD", None)])


def break_mixed_currency(books: LedgerBooks) -> None:
    books.add_transaction(6, [(1, "USD", "10.00"), (4, "EUR", "-10.00")])


def break_orphans(books: LedgerBooks) -> None:
    books.add_transaction(7, [(1, "USD", "1.00"), (2, "USD", "-1.00")], header=False)


# check -> (how to break it, the offending key it must report)
BREAKERS: dict[CheckName, tuple[Callable[[LedgerBooks], None], str]] = {
    CheckName.TRANSACTION_BALANCE: (break_transaction_balance, "3/USD"),
    CheckName.MINIMUM_LEGS: (break_minimum_legs, "4"),
    CheckName.TRIAL_BALANCE: (break_transaction_balance, "USD"),
    CheckName.STORED_BALANCES: (break_stored_balances, "3"),
    CheckName.FIELD_SANITY: (break_field_sanity, "5"),
    CheckName.MIXED_CURRENCY: (break_mixed_currency, "6"),
    CheckName.ORPHANS: (break_orphans, "7"),
}


@pytest.mark.parametrize("style", STYLES)
def test_balanced_books_pass_every_check(ledger_dsn: str, style: str) -> None:
    """Balanced books pass every target check of the default set, in each style."""
    books = make_books(ledger_dsn, style)
    result = run_ledger_checks(target_dsn=books.dsn, config=books.config())
    statuses = {check.name: check.status for check in result.checks}
    for name in TARGET_CHECKS:
        assert statuses[name] is CheckStatus.PASS, (name, result.render_text())
    assert statuses[CheckName.FINGERPRINT] is CheckStatus.SKIPPED
    assert result.balanced


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("check", TARGET_CHECKS)
def test_broken_books_fail_check(ledger_dsn: str, style: str, check: CheckName) -> None:
    """Each check fails, naming the offending key, on books broken for it."""
    books = make_books(ledger_dsn, style)
    breaker, expected_key = BREAKERS[check]
    breaker(books)
    result = run_one(books, check)
    assert result.status is CheckStatus.FAIL, result.message
    assert result.violations >= 1
    assert expected_key in result.offending_keys
    assert result.rows_examined > 0


@pytest.mark.parametrize("style", STYLES)
def test_usd_debit_against_eur_credit_is_unbalanced(ledger_dsn: str, style: str) -> None:
    """A transaction that balances in total but mixes USD and EUR fails per currency."""
    books = make_books(ledger_dsn, style)
    break_mixed_currency(books)
    result = run_one(books, CheckName.TRANSACTION_BALANCE)
    assert result.status is CheckStatus.FAIL
    assert result.offending_keys == ("6/EUR", "6/USD")
    assert result.violations == 2


def test_null_amounts_are_reported_by_balance_checks(ledger_dsn: str) -> None:
    """NULL amounts fail the balance checks instead of dropping out of SUM."""
    books = make_books(ledger_dsn, "side")
    books.add_transaction(8, [(1, "USD", "10.00"), (2, "USD", "-10.00"), (2, "USD", None)])
    config = books.config(checks=["transaction_balance", "trial_balance", "field_sanity"])
    result = run_ledger_checks(target_dsn=books.dsn, config=config)
    by_name = {check.name: check for check in result.checks}
    assert by_name[CheckName.TRANSACTION_BALANCE].status is CheckStatus.FAIL
    assert by_name[CheckName.TRANSACTION_BALANCE].offending_keys == ("8/USD",)
    assert "NULL amount" in by_name[CheckName.TRANSACTION_BALANCE].message
    assert by_name[CheckName.TRIAL_BALANCE].status is CheckStatus.FAIL
    assert by_name[CheckName.FIELD_SANITY].violations == 1
    assert by_name[CheckName.FIELD_SANITY].details["rules"] == {
        "NULL transaction id": 0, "NULL amount": 1, "NULL currency": 0, "NULL account": 0,
        "unknown side": 0, "non-positive amount": 0,
        "more decimals than the currency allows in amount": 0}


def test_real_column_imbalance_found_exactly(ledger_dsn: str) -> None:
    """A 0.01 imbalance that SUM over a real column rounds away is reported as 0.01."""
    books = make_books(ledger_dsn, "side", amount_type="real")
    books.add_transaction(9, [(1, "USD", "1000000"), (1, "USD", "0.01"),
                              (2, "USD", "-1000000")])
    float_net = books.query(
        "SELECT sum(CASE WHEN side = 'D' THEN amount ELSE -amount END) FROM postings "
        "WHERE transaction_id = 9")
    assert float_net == [(0.0,)], "the fixture must hide the cent from a real SUM"

    config = books.config(checks=["transaction_balance", "field_sanity"])
    result = run_ledger_checks(target_dsn=books.dsn, config=config)
    balance, sanity = result.checks
    assert balance.status is CheckStatus.FAIL
    assert balance.offending_keys == ("9/USD",)
    assert balance.details["unbalanced"] == [
        {"transaction_id": "9", "currency": "USD", "net": "0.01", "unknown_legs": 0}]
    assert sanity.status is CheckStatus.FAIL
    assert f"{books.schema}.postings.amount (real)" in sanity.message


def test_decimal_places_follow_currency_minor_units(ledger_dsn: str) -> None:
    """JPY with 0 minor units rejects 100.50 but accepts 100.00; USD keeps 2 places."""
    books = make_books(ledger_dsn, "signed")
    books.add_transaction(10, [(1, "JPY", "100.00"), (2, "JPY", "-100.00")])
    passing = run_ledger_checks(target_dsn=books.dsn, config=books.config(
        checks=["field_sanity"], minorUnits={"JPY": 0}))
    assert passing.checks[0].status is CheckStatus.PASS

    books.add_transaction(11, [(1, "JPY", "100.50"), (2, "JPY", "-100.50")])
    failing = run_ledger_checks(target_dsn=books.dsn, config=books.config(
        checks=["field_sanity"], minorUnits={"JPY": 0}))
    assert failing.checks[0].status is CheckStatus.FAIL
    assert failing.checks[0].offending_keys == ("11",)
    assert failing.checks[0].violations == 2


def test_non_positive_amount_with_side_column(ledger_dsn: str) -> None:
    """A negative amount on a side-column ledger breaks field sanity."""
    books = make_books(ledger_dsn, "side")
    books.execute(sql.SQL(
        "INSERT INTO {}.postings (transaction_id, amount, side, currency, account_id) "
        "VALUES (12, -5, 'D', 'USD', 1), (12, -5, 'C', 'USD', 2)").format(
            sql.Identifier(books.schema)))
    result = run_one(books, CheckName.FIELD_SANITY)
    assert result.status is CheckStatus.FAIL
    assert result.details["rules"]["non-positive amount"] == 2  # type: ignore[index]


def test_erp_line_with_debit_and_credit(ledger_dsn: str) -> None:
    """An ERP line carrying both a debit and a credit breaks field sanity."""
    books = make_books(ledger_dsn, "debit_credit_columns")
    books.execute(sql.SQL(
        "INSERT INTO {}.move_lines (move_id, debit, credit, currency, account_id) "
        "VALUES (13, 5, 5, 'USD', 1)").format(sql.Identifier(books.schema)))
    result = run_one(books, CheckName.FIELD_SANITY)
    assert result.status is CheckStatus.FAIL
    assert result.details["rules"]["both debit and credit"] == 1  # type: ignore[index]


def test_integer_side_codes(ledger_dsn: str) -> None:
    """Integer side markers (2 = debit, 1 = credit) work against an integer side column."""
    books = make_books(ledger_dsn, "side")
    schema = sql.Identifier(books.schema)
    books.execute(sql.SQL("ALTER TABLE {}.postings ALTER COLUMN side TYPE smallint USING "
                          "CASE side WHEN 'D' THEN 2 ELSE 1 END").format(schema))
    data = books.config_data(checks=["transaction_balance", "minimum_legs", "stored_balances"])
    data["postings"].update(debitValue=2, creditValue=1)
    result = run_ledger_checks(target_dsn=books.dsn,
                               config=type(books.config()).model_validate(data))
    assert [check.status for check in result.checks] == [CheckStatus.PASS] * 3


def test_text_marker_for_integer_side_column_is_rejected(ledger_dsn: str) -> None:
    """A text side marker on an integer side column is a configuration error naming both."""
    books = make_books(ledger_dsn, "side")
    books.execute(sql.SQL("ALTER TABLE {}.postings ALTER COLUMN side TYPE smallint USING "
                          "CASE side WHEN 'D' THEN 2 ELSE 1 END").format(
                              sql.Identifier(books.schema)))
    with pytest.raises(ConfigurationError, match=r"postings.debitValue is 'D'.*smallint"):
        run_ledger_checks(target_dsn=books.dsn, config=books.config())


def test_missing_column_names_table_and_field(ledger_dsn: str) -> None:
    """An unknown column stops the run before any check, naming column, field and table."""
    books = make_books(ledger_dsn, "side")
    data = books.config_data()
    data["postings"]["amount"] = "amount_minor"
    config = type(books.config()).model_validate(data)
    with pytest.raises(ConfigurationError,
                       match=rf"'amount_minor' \(postings.amount\) not found in table "
                             rf"{books.schema}.postings"):
        run_ledger_checks(target_dsn=books.dsn, config=config)


def test_missing_table_is_named(ledger_dsn: str) -> None:
    """An unknown table stops the run with an error naming it."""
    books = make_books(ledger_dsn, "side")
    data = books.config_data()
    data["accounts"]["table"] = f"{books.schema}.acounts"
    with pytest.raises(ConfigurationError, match=r"acounts' \(accounts.table\) not found"):
        run_ledger_checks(target_dsn=books.dsn,
                          config=type(books.config()).model_validate(data))


def test_hostile_column_name_executes_nothing(ledger_dsn: str) -> None:
    """A column name carrying a quote and a statement is rejected and the sentinel survives."""
    books = make_books(ledger_dsn, "side")
    schema = sql.Identifier(books.schema)
    books.execute(sql.SQL("CREATE TABLE {}.sentinel (id integer)").format(schema))
    data = books.config_data()
    data["postings"]["amount"] = f'amount"; DROP TABLE {books.schema}.sentinel; --'
    config = type(books.config()).model_validate(data)
    with pytest.raises(ConfigurationError, match="not found in table"):
        run_ledger_checks(target_dsn=books.dsn, config=config)
    assert books.query("SELECT count(*) FROM sentinel") == [(0,)]


def test_column_name_with_quote_and_semicolon_is_quoted(ledger_dsn: str) -> None:
    """A real column whose name contains a quote and a semicolon is read through quoting."""
    books = make_books(ledger_dsn, "side")
    schema = sql.Identifier(books.schema)
    books.execute(sql.SQL("CREATE TABLE {}.sentinel (id integer)").format(schema))
    odd_name = 'amt"; DROP TABLE sentinel; --'
    books.execute(sql.SQL("ALTER TABLE {}.postings RENAME COLUMN amount TO {}").format(
        schema, sql.Identifier(odd_name)))
    data = books.config_data(checks=["transaction_balance", "trial_balance", "field_sanity"])
    data["postings"]["amount"] = odd_name
    result = run_ledger_checks(target_dsn=books.dsn,
                               config=type(books.config()).model_validate(data))
    assert result.balanced, result.render_text()
    assert books.query("SELECT count(*) FROM sentinel") == [(0,)]


def test_timeout_is_reported_and_snapshot_survives(ledger_dsn: str) -> None:
    """A check past statement_timeout is TIMEOUT, and the next check still runs."""
    books = make_books(ledger_dsn, "side")
    schema = sql.Identifier(books.schema)
    books.execute(sql.SQL(
        "CREATE VIEW {}.slow_postings AS SELECT p.* FROM {}.postings AS p "
        "CROSS JOIN LATERAL (SELECT pg_sleep(0.2)) AS pause").format(schema, schema))
    data = books.config_data(checks=["transaction_balance", "orphans"],
                             statementTimeoutMs=100)
    data["postings"]["table"] = f"{books.schema}.slow_postings"
    result = run_ledger_checks(target_dsn=books.dsn,
                               config=type(books.config()).model_validate(data))
    assert [check.status for check in result.checks] == [CheckStatus.TIMEOUT] * 2
    assert not result.balanced
    assert result.failed_checks == (CheckName.TRANSACTION_BALANCE, CheckName.ORPHANS)
    assert result.render_text().startswith(
        "ledger: no verdict: transaction_balance, orphans did not finish")


def test_checks_run_in_one_read_only_snapshot(ledger_dsn: str) -> None:
    """The checks' transaction is REPEATABLE READ and READ ONLY."""
    books = make_books(ledger_dsn, "side")
    schema = sql.Identifier(books.schema)
    # The view's currency is NULL unless the reading transaction has both settings, so
    # field_sanity passes only inside such a transaction.
    books.execute(sql.SQL(
        "CREATE VIEW {}.guarded_postings AS SELECT p.transaction_id, p.amount, p.side, "
        "p.account_id, CASE WHEN current_setting('transaction_isolation') = 'repeatable read' "
        "AND current_setting('transaction_read_only') = 'on' THEN p.currency END AS currency "
        "FROM {}.postings AS p").format(schema, schema))
    data = books.config_data(checks=["field_sanity"])
    data["postings"]["table"] = f"{books.schema}.guarded_postings"
    config = type(books.config()).model_validate(data)
    assert books.query("SELECT count(currency) FROM guarded_postings") == [(0,)]

    result = run_ledger_checks(target_dsn=books.dsn, config=config)
    assert result.checks[0].status is CheckStatus.PASS, result.checks[0].message


def test_result_dict_hides_amounts_by_default(ledger_dsn: str) -> None:
    """to_dict() leaves amounts out; include_amounts=True adds them for the audit trail."""
    books = make_books(ledger_dsn, "side")
    break_transaction_balance(books)
    result: LedgerResult = run_ledger_checks(
        target_dsn=books.dsn, config=books.config(checks=["transaction_balance"]))
    public = result.to_dict()
    audit = result.to_dict(include_amounts=True)
    assert "details" not in public["checks"][0]  # type: ignore[index]
    assert "0.01" not in str(public)
    assert audit["checks"][0]["details"]["unbalanced"][0]["net"] == "0.01"  # type: ignore[index]
    assert public["failed_checks"] == ["transaction_balance"]


def test_stored_balance_of_credit_normal_account(ledger_dsn: str) -> None:
    """A credit-normal account's balance is credits minus debits, and drift is caught."""
    books = make_books(ledger_dsn, "signed")
    passing = run_one(books, CheckName.STORED_BALANCES)
    assert passing.status is CheckStatus.PASS
    books.execute(sql.SQL("UPDATE {}.accounts SET balance = -100.00 WHERE id = 2").format(
        sql.Identifier(books.schema)))
    failing = run_one(books, CheckName.STORED_BALANCES)
    assert failing.offending_keys == ("2",)
    assert failing.details["accounts"][0]["expected"] == "100.00"  # type: ignore[index]


def test_fixed_currency_ledger(ledger_dsn: str) -> None:
    """A ledger without a currency column uses the fixed currency for its checks."""
    books = make_books(ledger_dsn, "signed")
    data = books.config_data()
    del data["postings"]["currency"]
    data["postings"]["fixedCurrency"] = "USD"
    config = type(books.config()).model_validate(data)
    assert CheckName.MIXED_CURRENCY not in config.selected_checks()
    result = run_ledger_checks(target_dsn=books.dsn, config=config)
    trial = next(check for check in result.checks if check.name is CheckName.TRIAL_BALANCE)
    assert trial.status is CheckStatus.PASS
    assert trial.details["totals"][0]["currency"] == "USD"  # type: ignore[index]


def test_explicit_fingerprint_without_source_is_rejected(ledger_dsn: str) -> None:
    """Selecting fingerprint without a source DSN is a configuration error."""
    books = make_books(ledger_dsn, "side")
    with pytest.raises(ConfigurationError, match="pass a source DSN"):
        run_ledger_checks(target_dsn=books.dsn, config=books.config(checks=["fingerprint"]))


def test_failing_query_is_error_and_next_check_runs(ledger_dsn: str) -> None:
    """A check whose SQL fails reports ERROR, and the following check still passes."""
    books = make_books(ledger_dsn, "side")
    books.execute(sql.SQL("ALTER TABLE {}.accounts ALTER COLUMN id TYPE text").format(
        sql.Identifier(books.schema)))
    result = run_ledger_checks(target_dsn=books.dsn, config=books.config(
        checks=["stored_balances", "trial_balance"]))
    stored, trial = result.checks
    assert stored.status is CheckStatus.ERROR
    assert "operator does not exist" in stored.message
    assert trial.status is CheckStatus.PASS
    assert result.failed_checks == (CheckName.STORED_BALANCES,)


def test_signed_ledger_with_negative_debits(ledger_dsn: str) -> None:
    """debitSign negative reads negative amounts as debits, for balances too."""
    books = make_books(ledger_dsn, "signed")
    books.execute(sql.SQL("UPDATE {}.entries SET amount = -amount").format(
        sql.Identifier(books.schema)))
    data = books.config_data()
    data["postings"]["debitSign"] = "negative"
    result = run_ledger_checks(target_dsn=books.dsn,
                               config=type(books.config()).model_validate(data))
    assert result.balanced, result.render_text()


def test_default_normal_side_without_column(ledger_dsn: str) -> None:
    """Without a normal-side column every account takes defaultNormalSide."""
    books = make_books(ledger_dsn, "side")
    data = books.config_data(checks=["stored_balances"])
    del data["accounts"]["normalSide"]
    config = type(books.config()).model_validate(data)
    result = run_ledger_checks(target_dsn=books.dsn, config=config)
    # Accounts 2 and 4 are credit-normal in the fixture, so a debit default flags them.
    assert result.checks[0].offending_keys == ("2", "4")


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "single-currency"])
@pytest.mark.parametrize("style", STYLES)
def test_shared_grouping_pass_matches_single_checks(ledger_dsn: str, style: str,
                                                    mixed: bool) -> None:
    """Per-transaction checks run together report what each reports alone."""
    books = make_books(ledger_dsn, style)
    break_transaction_balance(books)
    break_minimum_legs(books)
    break_field_sanity(books)
    if mixed:
        break_mixed_currency(books)
        # A leg without a currency next to legs with one also needs per-currency groups.
        books.add_transaction(14, [(1, "USD", "3.00"), (2, None, "-3.00")])
    grouped = [CheckName.TRANSACTION_BALANCE, CheckName.MINIMUM_LEGS, CheckName.MIXED_CURRENCY]
    together = run_ledger_checks(target_dsn=books.dsn, config=books.config(
        checks=[name.value for name in grouped])).checks
    for shared in together:
        alone = run_one(books, shared.name)
        assert (shared.violations, shared.offending_keys, shared.rows_examined) == (
            alone.violations, alone.offending_keys, alone.rows_examined), shared.name
    assert "shared by the per-transaction checks" in together[1].message


def test_stored_balances_names_uncomparable_accounts(ledger_dsn: str) -> None:
    """An unknown normal side or a NULL balance is named as the cause, not as drift."""
    books = make_books(ledger_dsn, "side")
    schema = sql.Identifier(books.schema)
    books.execute(sql.SQL("UPDATE {}.accounts SET normal_side = 'X' WHERE id = 1").format(schema))
    books.execute(sql.SQL("UPDATE {}.accounts SET balance = NULL WHERE id = 2").format(schema))

    check = run_one(books, CheckName.STORED_BALANCES)

    assert check.status is CheckStatus.FAIL
    assert check.offending_keys == ("1", "2")
    assert check.message.endswith(
        "(1 with an unknown normal side, 1 with a NULL stored balance)"), check.message
