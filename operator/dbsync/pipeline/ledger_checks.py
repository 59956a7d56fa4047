"""The ledger checks: one function per check, each returning counts, keys and amounts.

Each check first runs one summary query (rows examined and violation count in a single
pass) and, only when it found violations, a second query for the first offending keys.  A
passing ledger therefore costs one scan per check.  Both queries run inside the caller's
snapshot, so they see the same rows.  Amounts go only into ``details``, which the caller
keeps out of status and logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
from psycopg import sql

from dbsync.pipeline.ledger_config import AmountStyle, DateSource
from dbsync.pipeline.ledger_sql import LedgerSchema, exact_value

Connection = psycopg.Connection[tuple[object, ...]]

NULL_KEY = "(null)"


@dataclass(frozen=True)
class CheckOutcome:
    """Findings of one check, to which the caller adds its name, status and duration."""

    rows_examined: int
    violations: int
    offending_keys: tuple[str, ...]
    message: str
    details: Mapping[str, object] = field(default_factory=dict)


def _as_int(value: object) -> int:
    if value is None:
        return 0
    assert isinstance(value, int | Decimal)
    return int(value)


def _as_amount(value: object) -> str | None:
    """Render an amount for the audit trail as exact decimal text."""
    if value is None:
        return None
    return str(value)


def _key(value: object) -> str:
    return NULL_KEY if value is None else str(value)


def _fetch_one(connection: Connection, query: sql.Composed) -> tuple[object, ...]:
    row = connection.execute(query).fetchone()
    assert row is not None, "an aggregate query returns one row"
    return row


def _plural(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


def _float_note(schema: LedgerSchema) -> str:
    if not schema.float_columns:
        return ""
    return ("; sums were computed exactly from the text form of floating-point column "
            f"{', '.join(schema.float_columns)}")


def _transaction_key(schema: LedgerSchema, transaction: object, currency: object) -> str:
    """Transaction id, followed by the currency when postings carry a currency column."""
    if schema.currency is None:
        return _key(transaction)
    return f"{_key(transaction)}/{_key(currency)}"


@dataclass(frozen=True)
class CurrencyTotals:
    """Debit and credit totals of one currency, as trial_balance reports them."""

    currency: str | None
    legs: int
    unknown_legs: int
    debits: Decimal | int
    credits: Decimal | int


@dataclass(frozen=True)
class TransactionSummary:
    """Counts of one grouping pass that serve transaction_balance, minimum_legs and
    mixed_currency together, so the postings are grouped once instead of three times.

    ``headerless_legs`` counts postings whose transaction has no header row, for orphans;
    it is None when the pass did not look the headers up.  ``currency_totals`` serves
    trial_balance; it is None when not asked for, or when some transaction spans several
    currencies, whose totals a per-transaction pass cannot split.
    """

    legs: int
    unbalanced_groups: int
    unknown_legs: int
    one_sided_transactions: int
    mixed_transactions: int
    headerless_legs: int | None = None
    currency_totals: tuple[CurrencyTotals, ...] | None = None


def _balance_groups(schema: LedgerSchema) -> sql.Composed:
    """Per (transaction, currency) group: its net, legs and legs with known amount and side."""
    return sql.SQL(
        "SELECT {txn} AS txn, {currency} AS currency, {net_sum} AS net, count(*) AS legs, "
        "count(*) FILTER (WHERE {known}) AS known_legs "
        "FROM {postings} GROUP BY {txn}, {currency_group}"
    ).format(txn=schema.transaction_ref, currency=schema.currency_ref,
             net_sum=schema.net_sum(), known=schema.leg_is_known(),
             currency_group=schema.currency_group, postings=schema.postings_table)


# Bits of the per-transaction flags aggregate: one bit_or over small integers replaces a
# count per property, which matters when millions of transactions are grouped.
_HAS_DEBIT = 1
_HAS_CREDIT = 2
_HAS_NULL_CURRENCY = 4
_HAS_CURRENCY = 8

# Upper bound on the number of transaction ranges, which keeps the query text bounded
# when a server allows many parallel workers per query.
MAX_TRANSACTION_RANGES = 64


def can_split_transactions(schema: LedgerSchema) -> bool:
    """Return whether an index leads with an integer transaction id, so ranges read cheaply."""
    column = schema.transaction_id
    return column.is_integer and column.name in schema.postings.index_leading_columns


def transaction_ranges(schema: LedgerSchema, connection: Connection
                       ) -> tuple[tuple[int | None, int | None], ...]:
    """Split the transaction ids into ranges that parallel workers can group on their own.

    PostgreSQL groups by transaction in one process, even when the scan below is parallel.
    Grouping disjoint id ranges in separate branches of a UNION ALL lets it run the branches
    in parallel workers (a Parallel Append), each branch finishing its own transactions.
    A split pays off only when an index leads with an integer transaction id, so that each
    branch reads its range alone.  Otherwise one range covers every id.
    """
    whole: tuple[tuple[int | None, int | None], ...] = ((None, None),)
    if not can_split_transactions(schema):
        return whole
    workers = connection.execute(
        "SELECT current_setting('max_parallel_workers_per_gather')::int").fetchone()
    # The leader runs a branch too, so a query can use one branch more than it has workers.
    branches = min(_as_int(workers[0] if workers else 0) + 1, MAX_TRANSACTION_RANGES)
    lowest, highest = _fetch_one(connection, sql.SQL(
        "SELECT min({txn}), max({txn}) FROM {postings}").format(
            txn=schema.transaction_ref, postings=schema.postings_table))
    if branches < 2 or not isinstance(lowest, int) or not isinstance(highest, int):
        return whole
    span = highest - lowest + 1
    if span < branches:
        return whole

    # NOTE: equal widths assume ids spread evenly between min and max.  Where they cluster,
    # one range contains most transactions and the pass gains less from the workers.
    bounds = [lowest + span * index // branches for index in range(1, branches)]
    starts: list[int | None] = [None, *bounds]
    stops: list[int | None] = [*bounds, None]
    return tuple(zip(starts, stops, strict=True))


def _range_condition(schema: LedgerSchema, start: int | None, stop: int | None
                     ) -> sql.Composable:
    """WHERE clause of one transaction range; open ends keep rows outside min..max in."""
    conditions: list[sql.Composable] = []
    if start is not None:
        conditions.append(sql.SQL("{} >= {}").format(schema.transaction_ref, sql.Literal(start)))
    if stop is not None:
        conditions.append(sql.SQL("{} < {}").format(schema.transaction_ref, sql.Literal(stop)))
    if not conditions:
        return sql.SQL("")
    return sql.SQL("WHERE {}").format(sql.SQL(" AND ").join(conditions))


def _header_keys(schema: LedgerSchema, start: int | None, stop: int | None) -> sql.Composed:
    """Transaction header ids in one range, as the join target of the summary pass."""
    assert schema.transactions is not None
    assert schema.header_id is not None
    header_id = sql.Identifier(schema.header_id.name)
    conditions: list[sql.Composable] = []
    if schema.header_id.is_integer:
        if start is not None:
            conditions.append(sql.SQL("{} >= {}").format(header_id, sql.Literal(start)))
        if stop is not None:
            conditions.append(sql.SQL("{} < {}").format(header_id, sql.Literal(stop)))
    where: sql.Composable = sql.SQL("")
    if conditions:
        where = sql.SQL("WHERE {}").format(sql.SQL(" AND ").join(conditions))
    distinct = sql.SQL("") if schema.header_id.name in schema.transactions.unique_columns else (
        sql.SQL("DISTINCT "))
    return sql.SQL("(SELECT {distinct}{id} FROM {table} {where}) AS h").format(
        distinct=distinct, id=header_id, table=schema.transactions.identifier, where=where)


def _summary_branch(schema: LedgerSchema, start: int | None, stop: int | None, *,
                    null_transactions: bool = False, with_headers: bool = False,
                    with_currency_totals: bool = False) -> sql.Composed:
    """Group one range of transactions and count each check's violations within it.

    With ``with_headers`` each group is also looked up among the transaction headers of
    the same range, which costs far less than joining every posting to the headers.  With
    ``with_currency_totals`` the counts come per currency, with debit and credit totals.
    That costs one more small hash table, while a separate trial_balance query would read
    every posting again.
    """
    where: sql.Composable = _range_condition(schema, start, stop)
    if null_transactions:
        where = sql.SQL("WHERE {} IS NULL").format(schema.transaction_ref)
    headers: sql.Composable = sql.SQL("")
    headerless: sql.Composable = sql.SQL("NULL::bigint")
    if with_headers:
        headers = sql.SQL("LEFT JOIN {} ON {} = t.txn").format(
            _header_keys(schema, start, stop), schema.header_id_ref())
        headerless = sql.SQL(
            "coalesce(sum(t.legs) FILTER (WHERE t.txn IS NOT NULL AND {} IS NULL), 0)"
        ).format(schema.header_id_ref())
    flags = sql.SQL(
        "bit_or(CASE WHEN {debit} THEN {has_debit} ELSE 0 END "
        "| CASE WHEN {credit} THEN {has_credit} ELSE 0 END "
        "| CASE WHEN {currency} IS NULL THEN {null_currency} ELSE {with_currency} END)"
    ).format(debit=schema.is_debit(), credit=schema.is_credit(),
             currency=schema.currency_group, has_debit=sql.Literal(_HAS_DEBIT),
             has_credit=sql.Literal(_HAS_CREDIT), null_currency=sql.Literal(_HAS_NULL_CURRENCY),
             with_currency=sql.Literal(_HAS_CURRENCY))
    both_sides = sql.Literal(_HAS_DEBIT | _HAS_CREDIT)
    both_currency_kinds = sql.Literal(_HAS_NULL_CURRENCY | _HAS_CURRENCY)
    sums: sql.Composable = sql.SQL("")
    totals: sql.Composable = sql.SQL("NULL::numeric AS debits, NULL::numeric AS credits")
    if with_currency_totals:
        sums = sql.SQL(", {} AS debits, {} AS credits").format(schema.debit_sum(),
                                                                schema.credit_sum())
        totals = sql.SQL("sum(t.debits) AS debits, sum(t.credits) AS credits")
    currencies: sql.Composable
    if schema.currency is not None:
        currencies = sql.SQL("min({currency}) AS first_currency, max({currency}) AS "
                             "last_currency").format(currency=schema.currency_group)
        mixed = sql.SQL("t.first_currency <> t.last_currency")
    else:
        currencies = sql.SQL("NULL AS first_currency")
        mixed = sql.SQL("false")
    currency_key: sql.Composable = sql.SQL("NULL::text")
    group: sql.Composable = sql.SQL("")
    if with_currency_totals:
        currency_key = (sql.SQL("t.first_currency::text") if schema.currency is not None
                        else schema.currency_ref)
        group = sql.SQL("GROUP BY 1")
    return sql.SQL(
        "SELECT {currency_key} AS currency, coalesce(sum(t.legs), 0) AS legs, "
        "count(*) FILTER (WHERE t.net <> 0 OR t.known_legs < t.legs) AS unbalanced, "
        "coalesce(sum(t.legs - t.known_legs), 0) AS unknown_legs, "
        "count(*) FILTER (WHERE t.flags & {both_sides} <> {both_sides}) AS one_sided, "
        "count(*) FILTER (WHERE {mixed}) AS mixed, "
        "count(*) FILTER (WHERE {mixed} OR t.flags & {both_kinds} = {both_kinds}) AS split, "
        "{headerless} AS headerless_legs, {totals} "
        "FROM (SELECT {txn} AS txn, {net_sum} AS net, count(*) AS legs, "
        "count(*) FILTER (WHERE {known}) AS known_legs, {flags} AS flags, {currencies}"
        "{sums} FROM {postings} {where} GROUP BY {txn}) AS t {headers} {group}"
    ).format(currency_key=currency_key, group=group, totals=totals, sums=sums,
             both_sides=both_sides, mixed=mixed, both_kinds=both_currency_kinds,
             headerless=headerless, net_sum=schema.net_sum(), known=schema.leg_is_known(),
             flags=flags, currencies=currencies, postings=schema.postings_table, where=where,
             txn=schema.transaction_ref, headers=headers)


def summarize_transactions(schema: LedgerSchema, connection: Connection, *,
                           with_headers: bool = False, with_currency_totals: bool = False
                           ) -> TransactionSummary:
    """Count the violations of the three per-transaction checks in one grouping pass.

    The pass groups by transaction alone, in parallel ranges when an index allows it (see
    :func:`transaction_ranges`); rows with a NULL transaction id form one more group.  A
    transaction whose legs all carry one currency is one (transaction, currency) group, so
    its net decides transaction_balance.  Only when some transaction has legs in several
    currencies, or legs without a currency next to legs with one, is the per-currency
    grouping run as well to count its groups.  With ``with_headers`` (which needs a
    configured transactions table) the pass also counts legs without a header, and with
    ``with_currency_totals`` it totals debits and credits per currency.
    """
    with_headers = with_headers and schema.transactions is not None
    ranges = transaction_ranges(schema, connection)
    branches: list[sql.Composable] = [
        _summary_branch(schema, start, stop, with_headers=with_headers,
                        with_currency_totals=with_currency_totals)
        for start, stop in ranges]
    # Ranges leave out NULL transaction ids, so a nullable column gets a branch for them.
    # (A branch that the planner proves empty would keep it from planning in parallel.)
    if len(ranges) > 1 and not schema.transaction_id.not_null:
        branches.append(_summary_branch(schema, None, None, null_transactions=True,
                                        with_headers=with_headers,
                                        with_currency_totals=with_currency_totals))
    # Aggregating over the UNION ALL, rather than running it bare, lets the planner flatten
    # it into one append whose branches go to parallel workers, with a partial aggregate
    # in each worker.
    rows = connection.execute(sql.SQL(
        "SELECT b.currency, sum(b.legs), sum(b.unbalanced), sum(b.unknown_legs), "
        "sum(b.one_sided), sum(b.mixed), sum(b.split), sum(b.headerless_legs), "
        "sum(b.debits), sum(b.credits) FROM ({}) AS b GROUP BY b.currency"
    ).format(sql.SQL(" UNION ALL ").join(branches))).fetchall()

    # One row, or one row per currency when totals were asked for: add the counts up.
    counts = [sum(_as_int(row[column]) for row in rows) for column in range(1, 7)]
    legs, unbalanced, unknown, one_sided, mixed, split = counts
    headerless = sum(_as_int(row[7]) for row in rows) if with_headers else None
    if split:
        # Per-transaction nets cannot tell which currency is off, so count the groups.
        unbalanced = _as_int(_fetch_one(connection, sql.SQL(
            "SELECT count(*) FILTER (WHERE g.net <> 0 OR g.known_legs < g.legs) "
            "FROM ({groups}) AS g").format(groups=_balance_groups(schema)))[0])
    totals = _currency_totals(rows) if with_currency_totals and not split else None
    return TransactionSummary(legs=legs, unbalanced_groups=unbalanced, unknown_legs=unknown,
                              one_sided_transactions=one_sided, mixed_transactions=mixed,
                              headerless_legs=headerless, currency_totals=totals)


def _currency_totals(rows: Sequence[tuple[object, ...]]) -> tuple[CurrencyTotals, ...]:
    """Turn the pass's per-currency rows into totals, ordered as trial_balance orders them."""
    totals = [
        CurrencyTotals(currency=None if row[0] is None else str(row[0]), legs=_as_int(row[1]),
                       unknown_legs=_as_int(row[3]),
                       debits=row[8] if isinstance(row[8], Decimal | int) else 0,
                       credits=row[9] if isinstance(row[9], Decimal | int) else 0)
        for row in rows]
    return tuple(sorted(totals, key=lambda total: (total.currency is None, total.currency or "")))


SHARED_GROUPING_NOTE = " (counted in the grouping pass shared by the per-transaction checks)"


def check_transaction_balance(schema: LedgerSchema, connection: Connection, *,
                              limit: int, summary: TransactionSummary | None = None
                              ) -> CheckOutcome:
    """Check that every transaction nets to zero in each of its currencies.

    Grouping by currency as well as transaction makes a USD debit and an equal EUR credit
    two unbalanced groups instead of a balanced pair.  A leg whose amount or side is unknown
    makes its group unprovable, so it counts as a violation rather than dropping out of SUM.
    """
    grouped = _balance_groups(schema)
    violation = sql.SQL("(g.net <> 0 OR g.known_legs < g.legs)")

    if summary is None:
        rows, violations, unknown_legs = _fetch_one(connection, sql.SQL(
            "SELECT coalesce(sum(g.legs), 0), count(*) FILTER (WHERE {violation}), "
            "coalesce(sum(g.legs - g.known_legs), 0) FROM ({grouped}) AS g"
        ).format(violation=violation, grouped=grouped))
    else:
        rows, violations = summary.legs, summary.unbalanced_groups
        unknown_legs = summary.unknown_legs
    violation_count = _as_int(violations)

    keys: list[str] = []
    unbalanced: list[dict[str, object]] = []
    if violation_count:
        for transaction, currency, group_net, group_unknown in connection.execute(sql.SQL(
            "SELECT g.txn, g.currency, g.net, g.legs - g.known_legs FROM ({grouped}) AS g "
            "WHERE {violation} ORDER BY g.txn, g.currency LIMIT {limit}"
        ).format(grouped=grouped, violation=violation, limit=sql.Literal(limit))):
            keys.append(_transaction_key(schema, transaction, currency))
            unbalanced.append({"transaction_id": _key(transaction), "currency": _key(currency),
                               "net": _as_amount(group_net),
                               "unknown_legs": _as_int(group_unknown)})

    message = (f"{_plural(violation_count, 'transaction/currency group')} "
               f"{'does' if violation_count == 1 else 'do'} not net to zero")
    if _as_int(unknown_legs):
        message += f"; {_plural(_as_int(unknown_legs), 'leg')} with a NULL amount or unknown side"
    return CheckOutcome(rows_examined=_as_int(rows), violations=violation_count,
                        offending_keys=tuple(keys), message=message + _float_note(schema),
                        details={"unbalanced": unbalanced})


def check_minimum_legs(schema: LedgerSchema, connection: Connection, *,
                       limit: int, summary: TransactionSummary | None = None) -> CheckOutcome:
    """Check that every transaction has at least one debit leg and one credit leg."""
    grouped = sql.SQL(
        "SELECT {txn} AS txn, count(*) AS legs, count(*) FILTER (WHERE {debit}) AS debit_legs, "
        "count(*) FILTER (WHERE {credit}) AS credit_legs FROM {postings} GROUP BY {txn}"
    ).format(txn=schema.transaction_ref, debit=schema.is_debit(), credit=schema.is_credit(),
             postings=schema.postings_table)
    violation = sql.SQL("(g.debit_legs = 0 OR g.credit_legs = 0)")

    if summary is None:
        rows, violations = _fetch_one(connection, sql.SQL(
            "SELECT coalesce(sum(g.legs), 0), count(*) FILTER (WHERE {violation}) "
            "FROM ({grouped}) AS g").format(violation=violation, grouped=grouped))
    else:
        rows, violations = summary.legs, summary.one_sided_transactions
    violation_count = _as_int(violations)

    keys: list[str] = []
    one_sided: list[dict[str, object]] = []
    if violation_count:
        for transaction, debit_legs, credit_legs in connection.execute(sql.SQL(
            "SELECT g.txn, g.debit_legs, g.credit_legs FROM ({grouped}) AS g "
            "WHERE {violation} ORDER BY g.txn LIMIT {limit}"
        ).format(grouped=grouped, violation=violation, limit=sql.Literal(limit))):
            keys.append(_key(transaction))
            one_sided.append({"transaction_id": _key(transaction),
                              "debit_legs": _as_int(debit_legs),
                              "credit_legs": _as_int(credit_legs)})

    message = (f"{_plural(violation_count, 'transaction')} "
               f"{'lacks' if violation_count == 1 else 'lack'} a debit or a credit leg")
    if summary is not None:
        message += SHARED_GROUPING_NOTE
    return CheckOutcome(rows_examined=_as_int(rows), violations=violation_count,
                        offending_keys=tuple(keys), message=message,
                        details={"one_sided": one_sided})


def check_trial_balance(schema: LedgerSchema, connection: Connection, *, limit: int,
                        summary: TransactionSummary | None = None) -> CheckOutcome:
    """Check that total debits equal total credits in each currency.

    A ``summary`` with currency totals supplies them without reading the postings again.
    """
    rows: list[tuple[object, ...]]
    if summary is not None and summary.currency_totals is not None:
        rows = [(total.currency, total.legs, total.unknown_legs, total.debits, total.credits)
                for total in summary.currency_totals]
    else:
        rows = connection.execute(sql.SQL(
            "SELECT {currency}, count(*), count(*) - count(*) FILTER (WHERE {known}), "
            "{debit_sum}, {credit_sum} FROM {postings} GROUP BY {currency_group}"
        ).format(currency=schema.currency_ref, currency_group=schema.currency_group,
                 known=schema.leg_is_known(), debit_sum=schema.debit_sum(),
                 credit_sum=schema.credit_sum(), postings=schema.postings_table)).fetchall()
        # Sorted here rather than in SQL, so the order never depends on a collation.
        rows.sort(key=lambda row: (row[0] is None, str(row[0] or "")))

    examined = 0
    unknown_total = 0
    keys: list[str] = []
    totals: list[dict[str, object]] = []
    for currency, count, unknown, debits, credits in rows:
        examined += _as_int(count)
        unknown_total += _as_int(unknown)
        debit_total = debits if isinstance(debits, Decimal | int) else 0
        credit_total = credits if isinstance(credits, Decimal | int) else 0
        balanced = debit_total == credit_total and not _as_int(unknown)
        if not balanced:
            keys.append(_key(currency))
        totals.append({"currency": _key(currency), "debits": _as_amount(debit_total),
                       "credits": _as_amount(credit_total),
                       "difference": _as_amount(debit_total - credit_total),
                       "unknown_legs": _as_int(unknown), "balanced": balanced})

    message = (f"{_plural(len(keys), 'currency', 'currencies')} out of {len(rows)} "
               f"{'has' if len(keys) == 1 else 'have'} debits unequal to credits")
    if unknown_total:
        message += f"; {_plural(unknown_total, 'leg')} with a NULL amount or unknown side"
    if summary is not None and summary.currency_totals is not None:
        message += SHARED_GROUPING_NOTE
    return CheckOutcome(rows_examined=examined, violations=len(keys),
                        offending_keys=tuple(keys[:limit]),
                        message=message + _float_note(schema), details={"totals": totals})


def check_stored_balances(schema: LedgerSchema, connection: Connection, *,
                          limit: int) -> CheckOutcome:
    """Check that each account's stored balance equals the net of its postings.

    A debit-normal account's balance is its debits minus its credits and a credit-normal
    account's the reverse.  An account without postings must hold zero.
    """
    assert schema.accounts is not None
    joined = sql.SQL(
        "SELECT {account_id} AS account, {stored} AS stored, "
        "{sign} * coalesce(posted.net, 0) AS expected, {sign} AS sign, "
        "coalesce(posted.legs, 0) AS legs, coalesce(posted.unknown_legs, 0) AS unknown_legs "
        "FROM {accounts} AS a LEFT JOIN ("
        "SELECT {posting_account} AS account, {net_sum} AS net, count(*) AS legs, "
        "count(*) - count(*) FILTER (WHERE {known}) AS unknown_legs "
        "FROM {postings} GROUP BY 1) AS posted ON posted.account = {account_id}"
    ).format(account_id=schema.account_id_ref(), stored=schema.account_balance_value(),
             sign=schema.account_sign(), accounts=schema.accounts.identifier,
             posting_account=schema.account_ref, net_sum=schema.net_sum(),
             known=schema.leg_is_known(), postings=schema.postings_table)
    violation = sql.SQL("(j.stored IS NULL OR j.sign IS NULL OR j.unknown_legs > 0 "
                        "OR j.stored <> j.expected)")

    accounts, legs, violations, no_sign, no_balance, unknown_legs = _fetch_one(
        connection, sql.SQL(
            "SELECT count(*), coalesce(sum(j.legs), 0), count(*) FILTER (WHERE {violation}), "
            "count(*) FILTER (WHERE j.sign IS NULL), count(*) FILTER (WHERE j.stored IS NULL), "
            "count(*) FILTER (WHERE j.unknown_legs > 0) FROM ({joined}) AS j"
        ).format(violation=violation, joined=joined))
    violation_count = _as_int(violations)

    keys: list[str] = []
    drifted: list[dict[str, object]] = []
    if violation_count:
        for account, stored, expected, sign, unknown in connection.execute(sql.SQL(
            "SELECT j.account, j.stored, j.expected, j.sign, j.unknown_legs FROM ({joined}) AS j "
            "WHERE {violation} ORDER BY j.account LIMIT {limit}"
        ).format(joined=joined, violation=violation, limit=sql.Literal(limit))):
            keys.append(_key(account))
            drifted.append({"account_id": _key(account), "stored": _as_amount(stored),
                            "expected": _as_amount(expected),
                            "unknown_normal_side": sign is None,
                            "unknown_legs": _as_int(unknown)})

    message = (f"{_plural(violation_count, 'account')} out of {_as_int(accounts)} "
               f"{'has' if violation_count == 1 else 'have'} a stored balance unequal to "
               "the net of its postings")
    # Accounts whose balance cannot be compared at all are counted apart, because their fix
    # is in the accounts table or the postings rather than in the balance.
    causes = [f"{_as_int(count)} {cause}" for count, cause in (
        (no_sign, "with an unknown normal side"), (no_balance, "with a NULL stored balance"),
        (unknown_legs, "with postings of unknown amount or side")) if _as_int(count)]
    if causes:
        message += f" ({', '.join(causes)})"
    return CheckOutcome(rows_examined=_as_int(accounts) + _as_int(legs),
                        violations=violation_count, offending_keys=tuple(keys),
                        message=message + _float_note(schema), details={"accounts": drifted})


def _field_rules(schema: LedgerSchema) -> list[tuple[str, sql.Composable]]:
    """Return (rule, condition) pairs; each condition is true for a row breaking the rule."""
    rules: list[tuple[str, sql.Composable]] = [
        ("NULL transaction id", sql.SQL("{} IS NULL").format(schema.transaction_ref)),
        ("NULL amount", sql.SQL("({})").format(schema.amount_is_null())),
    ]
    if schema.currency is not None:
        rules.append(("NULL currency", sql.SQL("{} IS NULL").format(schema.currency_ref)))
    if schema.account is not None:
        rules.append(("NULL account", sql.SQL("{} IS NULL").format(schema.account_ref)))

    style = schema.config.postings.style
    if style is AmountStyle.SIDE:
        rules.append(("unknown side", sql.SQL("NOT coalesce({} OR {}, false)").format(
            schema.is_debit(), schema.is_credit())))
        assert schema.amount is not None
        rules.append(("non-positive amount", sql.SQL("{} <= 0").format(
            exact_value("p", schema.amount))))
    elif style is AmountStyle.SIGNED:
        rules.append(("zero amount", sql.SQL("{} = 0").format(schema.net_value())))
    else:
        rules.append(("negative debit or credit", sql.SQL("({} < 0 OR {} < 0)").format(
            schema.debit_value(), schema.credit_value())))
        rules.append(("both debit and credit", sql.SQL("({} <> 0 AND {} <> 0)").format(
            schema.debit_value(), schema.credit_value())))

    # Integer amounts are minor units already, so only decimal columns can carry extra
    # digits, and a numeric(p,s) column cannot when no currency allows fewer than s places.
    # min_scale() is the exact test; the cheap scale() in front of it skips most rows.
    minor_units = schema.minor_units()
    fewest_units = schema.fewest_minor_units()
    for column in schema.amount_columns:
        if column.is_integer:
            continue
        rule = f"more decimals than the currency allows in {column.name}"
        declared = column.declared_scale
        if declared is not None and declared <= fewest_units:
            rules.append((rule, sql.SQL("false")))
            continue
        value = exact_value("p", column)
        rules.append((rule, sql.SQL("(scale({value}) > {units} AND min_scale({value}) > {units})")
                      .format(value=value, units=minor_units)))
    return rules


def check_field_sanity(schema: LedgerSchema, connection: Connection, *,
                       limit: int) -> CheckOutcome:
    """Count rows breaking a field rule, and report float money columns as findings."""
    rules = _field_rules(schema)
    any_rule = sql.SQL(" OR ").join(sql.SQL("coalesce({}, false)").format(condition)
                                    for _, condition in rules)
    rows, bad_rows = (_as_int(value) for value in _fetch_one(connection, sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE {any_rule}) FROM {postings}"
    ).format(any_rule=any_rule, postings=schema.postings_table)))

    # Counting each rule apart evaluates every condition again, so only a failing ledger
    # pays for it.
    per_rule = {name: 0 for name, _ in rules}
    if bad_rows:
        counts = _fetch_one(connection, sql.SQL("SELECT {per_rule} FROM {postings}").format(
            per_rule=sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE {})").format(condition)
                                        for _, condition in rules),
            postings=schema.postings_table))
        per_rule = {name: _as_int(count)
                    for (name, _), count in zip(rules, counts, strict=True)}

    keys: list[str] = []
    if bad_rows:
        keys = [_key(row[0]) for row in connection.execute(sql.SQL(
            "SELECT DISTINCT {txn} FROM {postings} WHERE {any_rule} ORDER BY 1 LIMIT {limit}"
        ).format(txn=schema.transaction_ref, postings=schema.postings_table,
                 any_rule=any_rule, limit=sql.Literal(limit)))]
    float_columns = schema.float_columns

    broken = [f"{count} {name}" for name, count in per_rule.items() if count]
    message = f"{_plural(bad_rows, 'row')} {'breaks' if bad_rows == 1 else 'break'} a field rule"
    if broken:
        message += f" ({', '.join(broken)})"
    if float_columns:
        message += (f"; money stored as floating point in {', '.join(float_columns)}: "
                    "use numeric or integer minor units")
    return CheckOutcome(rows_examined=rows, violations=bad_rows + len(float_columns),
                        offending_keys=tuple(keys), message=message,
                        details={"rules": per_rule, "float_columns": list(float_columns)})


def check_mixed_currency(schema: LedgerSchema, connection: Connection, *,
                         limit: int, summary: TransactionSummary | None = None
                         ) -> CheckOutcome:
    """Check that every transaction's legs share one currency."""
    grouped = sql.SQL(
        "SELECT {txn} AS txn, count(*) AS legs, min({currency}) <> max({currency}) AS mixed "
        "FROM {postings} GROUP BY {txn}"
    ).format(txn=schema.transaction_ref, currency=schema.currency_group,
             postings=schema.postings_table)

    if summary is None:
        rows, violations = _fetch_one(connection, sql.SQL(
            "SELECT coalesce(sum(g.legs), 0), count(*) FILTER (WHERE g.mixed) "
            "FROM ({grouped}) AS g").format(grouped=grouped))
    else:
        rows, violations = summary.legs, summary.mixed_transactions
    violation_count = _as_int(violations)

    keys: list[str] = []
    if violation_count:
        keys = [_key(row[0]) for row in connection.execute(sql.SQL(
            "SELECT g.txn FROM ({grouped}) AS g WHERE g.mixed ORDER BY g.txn LIMIT {limit}"
        ).format(grouped=grouped, limit=sql.Literal(limit)))]

    message = (f"{_plural(violation_count, 'transaction')} "
               f"{'mixes' if violation_count == 1 else 'mix'} currencies")
    if summary is not None:
        message += SHARED_GROUPING_NOTE
    return CheckOutcome(rows_examined=_as_int(rows), violations=violation_count,
                        offending_keys=tuple(keys), message=message)


def _distinct_keys(table: sql.Composable, column: sql.Composable, *, unique: bool,
                   alias: str) -> sql.Composed:
    """Join target for an anti-join: the table itself when the key is unique, else its keys."""
    if unique:
        return sql.SQL("{} AS {}").format(table, sql.Identifier(alias))
    return sql.SQL("(SELECT DISTINCT {column} FROM {table}) AS {alias}").format(
        column=column, table=table, alias=sql.Identifier(alias))


def check_orphans(schema: LedgerSchema, connection: Connection, *, limit: int,
                  summary: TransactionSummary | None = None) -> CheckOutcome:
    """Find postings without their transaction header or with an account not in accounts.

    A ``summary`` that counted headerless legs settles the header half.  When it and the
    account lookup find nothing, the check passes without joining every posting to the
    headers.  Otherwise the full query below counts and names the orphans.
    """
    joins: list[sql.Composable] = []
    conditions: list[tuple[str, sql.Composable]] = []
    account_join: sql.Composable | None = None
    if schema.transactions is not None:
        assert schema.header_id is not None
        headers = _distinct_keys(schema.transactions.identifier,
                                 sql.Identifier(schema.header_id.name),
                                 unique=schema.header_id.name in schema.transactions.unique_columns,
                                 alias="h")
        joins.append(sql.SQL("LEFT JOIN {} ON {} = {}").format(
            headers, schema.header_id_ref(), schema.transaction_ref))
        conditions.append(("missing transaction header", sql.SQL(
            "({} IS NOT NULL AND {} IS NULL)").format(schema.transaction_ref,
                                                      schema.header_id_ref())))
    if schema.accounts is not None and schema.account is not None:
        assert schema.account_id is not None
        accounts = _distinct_keys(schema.accounts.identifier,
                                  sql.Identifier(schema.account_id.name),
                                  unique=schema.account_id.name in schema.accounts.unique_columns,
                                  alias="a")
        account_join = sql.SQL("LEFT JOIN {} ON {} = {}").format(
            accounts, schema.account_id_ref(), schema.account_ref)
        joins.append(account_join)
        conditions.append(("unknown account", sql.SQL("({} IS NOT NULL AND {} IS NULL)").format(
            schema.account_ref, schema.account_id_ref())))

    if summary is not None and summary.headerless_legs == 0:
        unknown_accounts = 0
        if account_join is not None:
            unknown_accounts = _as_int(_fetch_one(connection, sql.SQL(
                "SELECT count(*) FILTER (WHERE {condition}) FROM {postings} {join}"
            ).format(condition=conditions[-1][1], postings=schema.postings_table,
                     join=account_join))[0])
        if not unknown_accounts:
            return CheckOutcome(
                rows_examined=summary.legs, violations=0, offending_keys=(),
                message="0 postings without a matching row" + SHARED_GROUPING_NOTE,
                details={"kinds": {name: 0 for name, _ in conditions}})

    source = sql.SQL("{} {}").format(schema.postings_table, sql.SQL(" ").join(joins))
    any_orphan = sql.SQL(" OR ").join(condition for _, condition in conditions)
    counts = _fetch_one(connection, sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE {any_orphan}), {per_kind} FROM {source}"
    ).format(any_orphan=any_orphan, source=source,
             per_kind=sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE {})").format(condition)
                                         for _, condition in conditions)))
    rows, orphan_rows = _as_int(counts[0]), _as_int(counts[1])
    per_kind = {name: _as_int(count)
                for (name, _), count in zip(conditions, counts[2:], strict=True)}

    keys: list[str] = []
    if orphan_rows:
        keys = [_key(row[0]) for row in connection.execute(sql.SQL(
            "SELECT DISTINCT {txn} FROM {source} WHERE {any_orphan} ORDER BY 1 LIMIT {limit}"
        ).format(txn=schema.transaction_ref, source=source, any_orphan=any_orphan,
                 limit=sql.Literal(limit)))]

    found = [f"{count} {name}" for name, count in per_kind.items() if count]
    message = f"{_plural(orphan_rows, 'posting')} without a matching row"
    if found:
        message += f" ({', '.join(found)})"
    return CheckOutcome(rows_examined=rows, violations=orphan_rows,
                        offending_keys=tuple(keys), message=message, details={"kinds": per_kind})


@dataclass(frozen=True)
class Bucket:
    """One fingerprint bucket's totals; ``row_hash`` is the sum of 64-bit row hashes."""

    rows: int
    debits: Decimal | int | None
    credits: Decimal | int | None
    row_hash: Decimal | int | None


def fingerprint_buckets(schema: LedgerSchema, connection: Connection) -> dict[str, Bucket]:
    """Compute row count, debit and credit sums and a row hash per (day, currency) bucket.

    The row hash is a sum of per-row hashes, so it does not depend on row order, and unlike
    XOR a duplicated row changes it.  Amounts are hashed with trailing zeros trimmed, so a
    target whose column is numeric(20,4) matches a numeric(18,2) source.
    """
    row_parts: list[sql.Composable] = [schema.transaction_ref, *schema.normalized_amounts()]
    if schema.side is not None:
        row_parts.append(sql.SQL("p.{}").format(sql.Identifier(schema.side.name)))
    row_parts.append(schema.currency_ref)
    if schema.account is not None:
        row_parts.append(schema.account_ref)
    day = schema.bucket_day()
    row_parts.append(day)

    source: sql.Composable = schema.postings_table
    if schema.header_booked_at is not None and (
            schema.config.fingerprint.date_source is DateSource.TRANSACTIONS):
        assert schema.transactions is not None
        assert schema.header_id is not None
        header_id = sql.Identifier(schema.header_id.name)
        booked_at = sql.Identifier(schema.header_booked_at.name)
        if schema.header_id.name in schema.transactions.unique_columns:
            headers: sql.Composable = sql.SQL("{} AS h").format(schema.transactions.identifier)
        else:
            # Duplicate header ids would repeat postings, so keep one date per id.
            headers = sql.SQL("(SELECT {id}, min({booked}) AS {booked} FROM {table} "
                              "GROUP BY {id}) AS h").format(
                id=header_id, booked=booked_at, table=schema.transactions.identifier)
        source = sql.SQL("{} LEFT JOIN {} ON {} = {}").format(
            schema.postings_table, headers, schema.header_id_ref(), schema.transaction_ref)

    buckets: dict[str, Bucket] = {}
    for bucket_day, currency, rows, debits, credits, row_hash in connection.execute(sql.SQL(
        "SELECT {day}, {currency}, count(*), sum({debit}), sum({credit}), "
        "sum(hashtextextended(ROW({row})::text, 0)) FROM {source} GROUP BY 1, {currency_group}"
    ).format(day=day, currency=schema.currency_ref, currency_group=schema.currency_group,
             debit=schema.debit_value(), credit=schema.credit_value(),
             row=sql.SQL(", ").join(row_parts), source=source)):
        key = f"{_key(bucket_day)}/{_key(currency)}"
        buckets[key] = Bucket(
            rows=_as_int(rows),
            debits=debits if isinstance(debits, Decimal | int) else None,
            credits=credits if isinstance(credits, Decimal | int) else None,
            row_hash=row_hash if isinstance(row_hash, Decimal | int) else None,
        )
    return buckets


def compare_fingerprints(source: Mapping[str, Bucket], target: Mapping[str, Bucket], *,
                         limit: int) -> CheckOutcome:
    """Compare source and target buckets and name those that differ."""
    differing = sorted(key for key in source.keys() | target.keys()
                       if source.get(key) != target.get(key))
    only_source = sum(1 for key in differing if key not in target)
    only_target = sum(1 for key in differing if key not in source)

    def describe(bucket: Bucket | None) -> dict[str, object] | None:
        if bucket is None:
            return None
        return {"rows": bucket.rows, "debits": _as_amount(bucket.debits),
                "credits": _as_amount(bucket.credits)}

    details: Sequence[dict[str, object]] = [
        {"bucket": key, "source": describe(source.get(key)), "target": describe(target.get(key))}
        for key in differing[:limit]
    ]
    message = (f"{_plural(len(differing), 'bucket')} of "
               f"{len(source.keys() | target.keys())} "
               f"{'differs' if len(differing) == 1 else 'differ'} between source and target")
    if only_source or only_target:
        message += f" ({only_source} only in source, {only_target} only in target)"
    rows = sum(bucket.rows for bucket in target.values())
    return CheckOutcome(rows_examined=rows, violations=len(differing),
                        offending_keys=tuple(differing[:limit]), message=message,
                        details={"buckets": list(details),
                                 "source_rows": sum(b.rows for b in source.values())})
