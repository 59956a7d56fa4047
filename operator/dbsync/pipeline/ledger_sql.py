"""Catalog lookup and SQL expressions for the ledger checks.

Every table and column name in a ledger configuration is looked up in the catalog before
any check runs, so a misspelt or hostile name stops the run with an error that names it.
Names reach SQL text only as a quoted ``psycopg.sql.Identifier``.  Marker values and
currency codes reach SQL only as ``psycopg.sql.Literal``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.ledger_config import (
    AmountStyle,
    DateSource,
    LedgerConfig,
    NormalSide,
    SideMarker,
    Sign,
)

FLOAT_TYPES = frozenset({"float4", "float8"})
INTEGER_TYPES = frozenset({"int2", "int4", "int8"})
AMOUNT_TYPES = FLOAT_TYPES | INTEGER_TYPES | {"numeric", "money"}
DATE_TYPES = frozenset({"date", "timestamp", "timestamptz"})

# format_type() of a numeric column with a declared precision and scale.
_DECLARED_NUMERIC = re.compile(r"numeric\(\d+,(\d+)\)")

# Ordinary tables, partitioned tables, views, materialized views and foreign tables.
_READABLE_RELKINDS = ("r", "p", "v", "m", "f")

_FIND_RELATION = """
SELECT c.oid, n.nspname, c.relname
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relname = %(name)s
  AND c.relkind = ANY(%(relkinds)s)
  AND CASE WHEN %(schema)s::text IS NULL THEN pg_catalog.pg_table_is_visible(c.oid)
           ELSE n.nspname = %(schema)s END
"""

# Domains are reported by their base type, so a domain over numeric counts as numeric.
_LIST_COLUMNS = """
SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), base.typname, a.attnotnull
FROM pg_catalog.pg_attribute AS a
JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
JOIN pg_catalog.pg_type AS base
  ON base.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_LIST_UNIQUE_COLUMNS = """
SELECT a.attname
FROM pg_catalog.pg_index AS i
JOIN pg_catalog.pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = %(oid)s AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
"""

# Columns that lead a valid, non-partial B-tree index: a range of their values can be read
# without scanning the whole table.
_LIST_INDEX_LEADING_COLUMNS = """
SELECT DISTINCT a.attname
FROM pg_catalog.pg_index AS i
JOIN pg_catalog.pg_class AS index_class ON index_class.oid = i.indexrelid
JOIN pg_catalog.pg_am AS am ON am.oid = index_class.relam
JOIN pg_catalog.pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = %(oid)s AND am.amname = 'btree' AND i.indisvalid AND i.indpred IS NULL
"""


@dataclass(frozen=True)
class Column:
    """A column as the catalog describes it."""

    name: str
    type_name: str
    base_type: str
    not_null: bool = False

    @property
    def is_float(self) -> bool:
        return self.base_type in FLOAT_TYPES

    @property
    def is_integer(self) -> bool:
        return self.base_type in INTEGER_TYPES

    @property
    def declared_scale(self) -> int | None:
        """Decimal places a ``numeric(p,s)`` column rounds every value to, else None."""
        match = _DECLARED_NUMERIC.fullmatch(self.type_name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Table:
    """A table or view found in the catalog, with its columns by name."""

    schema: str
    name: str
    columns: Mapping[str, Column]
    unique_columns: frozenset[str]
    index_leading_columns: frozenset[str] = frozenset()

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"


def split_table_name(configured: str) -> tuple[str | None, str]:
    """Split ``schema.table`` at its first dot; a name without a dot has no schema."""
    schema, dot, name = configured.partition(".")
    if not dot:
        return None, configured
    return schema, name


def find_table(connection: psycopg.Connection[tuple[object, ...]], configured: str, *,
               field: str) -> Table:
    """Look ``configured`` up in the catalog, raising ConfigurationError naming ``field``."""
    schema, name = split_table_name(configured)
    if not name or (schema is not None and not schema):
        raise ConfigurationError(
            f"{field} {configured!r} is not a table name: write table or schema.table")
    found = connection.execute(
        _FIND_RELATION,
        {"name": name, "schema": schema, "relkinds": list(_READABLE_RELKINDS)},
    ).fetchone()
    if found is None:
        where = f"schema {schema!r}" if schema is not None else "the search_path"
        raise ConfigurationError(
            f"table {configured!r} ({field}) not found in {where}: check the name, or "
            "qualify it as schema.table")
    oid, found_schema, found_name = found
    columns = {
        str(column_name): Column(name=str(column_name), type_name=str(type_name),
                                 base_type=str(base_type), not_null=bool(not_null))
        for column_name, type_name, base_type, not_null in connection.execute(
            _LIST_COLUMNS, {"oid": oid}).fetchall()
    }
    unique = frozenset(
        str(row[0]) for row in connection.execute(_LIST_UNIQUE_COLUMNS, {"oid": oid}))
    leading = frozenset(
        str(row[0]) for row in connection.execute(_LIST_INDEX_LEADING_COLUMNS, {"oid": oid}))
    return Table(schema=str(found_schema), name=str(found_name), columns=columns,
                 unique_columns=unique, index_leading_columns=leading)


def find_column(table: Table, name: str, *, field: str,
                allowed_types: frozenset[str] | None = None) -> Column:
    """Return column ``name`` of ``table``, raising ConfigurationError naming ``field``."""
    column = table.columns.get(name)
    if column is None:
        known = ", ".join(table.columns) or "none"
        raise ConfigurationError(
            f"column {name!r} ({field}) not found in table {table.label}; its columns are: "
            f"{known}")
    if allowed_types is not None and column.base_type not in allowed_types:
        raise ConfigurationError(
            f"column {table.label}.{name} ({field}) has type {column.type_name}; expected one "
            f"of {', '.join(sorted(allowed_types))}")
    return column


def _check_marker_type(marker: SideMarker, column: Column, *, table: Table, field: str) -> None:
    """Reject a text marker for an integer column and the reverse, before any SQL runs."""
    if column.is_integer and not isinstance(marker, int):
        raise ConfigurationError(
            f"{field} is {marker!r} but column {table.label}.{column.name} is "
            f"{column.type_name}: use an integer marker")
    if not column.is_integer and isinstance(marker, int):
        raise ConfigurationError(
            f"{field} is {marker} but column {table.label}.{column.name} is "
            f"{column.type_name}: quote the marker to make it text")


def _column_ref(alias: str, column: Column) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column.name))


def exact_value(alias: str, column: Column) -> sql.Composable:
    """Return ``alias.column`` as an exact number.

    A float keeps the digits its text form shows.  ``real`` and ``double precision`` print
    the shortest text that reads back as the same value (PostgreSQL 12 and later), so the
    cast through text gives the decimal value the application most likely stored.
    """
    reference = _column_ref(alias, column)
    if column.is_float:
        return sql.SQL("({}::text::numeric)").format(reference)
    if column.base_type == "money":
        return sql.SQL("({}::numeric)").format(reference)
    return reference


@dataclass(frozen=True)
class LedgerSchema:
    """The configured ledger resolved against one database's catalog.

    Builds the SQL expressions the checks share.  Postings use the alias ``p``, accounts
    ``a`` and transaction headers ``h``.
    """

    config: LedgerConfig
    postings: Table
    transaction_id: Column
    amount: Column | None
    side: Column | None
    debit_amount: Column | None
    credit_amount: Column | None
    currency: Column | None
    account: Column | None
    booked_at: Column | None
    accounts: Table | None
    account_id: Column | None
    account_balance: Column | None
    account_normal_side: Column | None
    transactions: Table | None
    header_id: Column | None
    header_booked_at: Column | None

    # -- columns of the postings table as SQL -------------------------------------------------

    @property
    def postings_table(self) -> sql.Composed:
        return sql.SQL("{} AS p").format(self.postings.identifier)

    @property
    def transaction_ref(self) -> sql.Composed:
        return _column_ref("p", self.transaction_id)

    @property
    def currency_group(self) -> sql.Composable:
        """The posting's currency column as stored, or the fixed currency as a literal.

        Grouping by the bare column, not a cast of it, lets the planner use an index whose
        key includes the currency.
        """
        if self.currency is not None:
            return _column_ref("p", self.currency)
        return sql.SQL("{}::text").format(sql.Literal(self.config.postings.fixed_currency))

    @property
    def currency_ref(self) -> sql.Composable:
        """The posting's currency as text, or the fixed currency as a literal."""
        if self.currency is not None:
            return sql.SQL("{}::text").format(_column_ref("p", self.currency))
        return sql.SQL("{}::text").format(sql.Literal(self.config.postings.fixed_currency))

    @property
    def account_ref(self) -> sql.Composed:
        assert self.account is not None
        return _column_ref("p", self.account)

    @property
    def amount_columns(self) -> tuple[Column, ...]:
        """The columns holding money amounts on a posting row."""
        return tuple(column for column in (self.amount, self.debit_amount, self.credit_amount)
                     if column is not None)

    @property
    def float_columns(self) -> tuple[str, ...]:
        """Labels of money columns stored as floating point, a finding in itself."""
        labels = [f"{self.postings.label}.{column.name} ({column.type_name})"
                  for column in self.amount_columns if column.is_float]
        if self.account_balance is not None and self.account_balance.is_float:
            assert self.accounts is not None
            labels.append(f"{self.accounts.label}.{self.account_balance.name} "
                          f"({self.account_balance.type_name})")
        return tuple(labels)

    def _amount(self) -> sql.Composable:
        assert self.amount is not None
        return exact_value("p", self.amount)

    def _side_is(self, marker: SideMarker | None) -> sql.Composed:
        assert self.side is not None
        return sql.SQL("{} = {}").format(_column_ref("p", self.side), sql.Literal(marker))

    def is_debit(self) -> sql.Composable:
        """Condition true for a debit leg."""
        style = self.config.postings.style
        if style is AmountStyle.SIDE:
            return self._side_is(self.config.postings.debit_value)
        if style is AmountStyle.SIGNED:
            operator = ">" if self.config.postings.debit_sign is Sign.POSITIVE else "<"
            return sql.SQL("{} {} 0").format(self._amount(), sql.SQL(operator))
        assert self.debit_amount is not None
        return sql.SQL("{} > 0").format(exact_value("p", self.debit_amount))

    def is_credit(self) -> sql.Composable:
        """Condition true for a credit leg."""
        style = self.config.postings.style
        if style is AmountStyle.SIDE:
            return self._side_is(self.config.postings.credit_value)
        if style is AmountStyle.SIGNED:
            operator = "<" if self.config.postings.debit_sign is Sign.POSITIVE else ">"
            return sql.SQL("{} {} 0").format(self._amount(), sql.SQL(operator))
        assert self.credit_amount is not None
        return sql.SQL("{} > 0").format(exact_value("p", self.credit_amount))

    def debit_value(self) -> sql.Composable:
        """Return the row's debit amount (positive), or NULL when the row is no debit."""
        style = self.config.postings.style
        if style is AmountStyle.DEBIT_CREDIT_COLUMNS:
            assert self.debit_amount is not None
            return exact_value("p", self.debit_amount)
        if style is AmountStyle.SIDE:
            return sql.SQL("CASE WHEN {} THEN {} END").format(self.is_debit(), self._amount())
        return sql.SQL("CASE WHEN {} THEN abs({}) END").format(self.is_debit(), self._amount())

    def credit_value(self) -> sql.Composable:
        """Return the row's credit amount (positive), or NULL when the row is no credit."""
        style = self.config.postings.style
        if style is AmountStyle.DEBIT_CREDIT_COLUMNS:
            assert self.credit_amount is not None
            return exact_value("p", self.credit_amount)
        if style is AmountStyle.SIDE:
            return sql.SQL("CASE WHEN {} THEN {} END").format(self.is_credit(), self._amount())
        return sql.SQL("CASE WHEN {} THEN abs({}) END").format(self.is_credit(), self._amount())

    def net_value(self) -> sql.Composable:
        """Debit minus credit of the row, NULL when an amount or the side is unknown."""
        style = self.config.postings.style
        if style is AmountStyle.SIDE:
            return sql.SQL("CASE WHEN {} THEN {} WHEN {} THEN -{} END").format(
                self.is_debit(), self._amount(), self.is_credit(), self._amount())
        if style is AmountStyle.SIGNED:
            if self.config.postings.debit_sign is Sign.POSITIVE:
                return self._amount()
            return sql.SQL("(-{})").format(self._amount())
        return sql.SQL("({} - {})").format(self.debit_value(), self.credit_value())

    def debit_sum(self) -> sql.Composable:
        """Aggregate: the group's debit total, NULL when it has no debit."""
        if self.config.postings.style is AmountStyle.SIDE:
            return sql.SQL("sum({}) FILTER (WHERE {})").format(self._amount(), self.is_debit())
        return sql.SQL("sum({})").format(self.debit_value())

    def credit_sum(self) -> sql.Composable:
        """Aggregate: the group's credit total, NULL when it has no credit."""
        if self.config.postings.style is AmountStyle.SIDE:
            return sql.SQL("sum({}) FILTER (WHERE {})").format(self._amount(), self.is_credit())
        return sql.SQL("sum({})").format(self.credit_value())

    def net_sum(self) -> sql.Composable:
        """Aggregate: debits minus credits of the group's known legs.

        Filtered sums of the stored amount avoid building a negated numeric per row, which
        roughly halves the time of grouping millions of transactions.
        """
        if self.config.postings.style is AmountStyle.SIGNED:
            return sql.SQL("coalesce(sum({}), 0)").format(self.net_value())
        return sql.SQL("(coalesce({}, 0) - coalesce({}, 0))").format(
            self.debit_sum(), self.credit_sum())

    def leg_is_known(self) -> sql.Composable:
        """Condition true when the row's amounts are present and its side is recognized."""
        not_null = sql.SQL(" AND ").join(
            sql.SQL("{} IS NOT NULL").format(_column_ref("p", column))
            for column in self.amount_columns)
        if self.config.postings.style is AmountStyle.SIDE:
            return sql.SQL("({} AND ({} OR {}))").format(not_null, self.is_debit(),
                                                         self.is_credit())
        return sql.SQL("({})").format(not_null)

    def amount_is_null(self) -> sql.Composable:
        """Condition true when an amount column of the row is NULL."""
        return sql.SQL(" OR ").join(
            sql.SQL("{} IS NULL").format(_column_ref("p", column))
            for column in self.amount_columns)

    def minor_units(self) -> sql.Composable:
        """Decimal places the row's currency allows, as an SQL integer expression."""
        config = self.config
        if self.currency is None:
            assert config.postings.fixed_currency is not None
            return sql.Literal(config.minor_units_for(config.postings.fixed_currency))
        if not config.minor_units:
            return sql.Literal(config.default_minor_units)
        branches = sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(sql.Literal(code), sql.Literal(units))
            for code, units in sorted(config.minor_units.items()))
        return sql.SQL("(CASE {} {} ELSE {} END)").format(
            self.currency_ref, branches, sql.Literal(config.default_minor_units))

    def fewest_minor_units(self) -> int:
        """Return the fewest decimal places that any posting's currency allows."""
        config = self.config
        if self.currency is None:
            assert config.postings.fixed_currency is not None
            return config.minor_units_for(config.postings.fixed_currency)
        return min([config.default_minor_units, *config.minor_units.values()])

    def normalized_amounts(self) -> list[sql.Composable]:
        """Amount columns with trailing zeros removed, so numeric(18,2) matches numeric(20,4)."""
        normalized: list[sql.Composable] = []
        for column in self.amount_columns:
            if column.is_integer:
                normalized.append(_column_ref("p", column))
            else:
                normalized.append(sql.SQL("trim_scale({})").format(exact_value("p", column)))
        return normalized

    def bucket_day(self) -> sql.Composable:
        """Return the bucket day as text, or a constant when no date is configured."""
        column = self.booked_at
        alias = "p"
        if self.config.fingerprint.date_source is DateSource.TRANSACTIONS:
            column = self.header_booked_at
            alias = "h"
        if column is None:
            return sql.SQL("'all'::text")
        reference = _column_ref(alias, column)
        if column.base_type == "timestamptz":
            return sql.SQL("({} AT TIME ZONE {})::date::text").format(
                reference, sql.Literal(self.config.fingerprint.time_zone))
        return sql.SQL("{}::date::text").format(reference)

    # -- accounts -----------------------------------------------------------------------------

    def normal_markers(self) -> tuple[SideMarker, SideMarker]:
        """Values of accounts.normalSide that mean debit-normal and credit-normal."""
        accounts = self.config.accounts
        postings = self.config.postings
        assert accounts is not None
        default_debit: SideMarker = "D"
        default_credit: SideMarker = "C"
        if postings.style is AmountStyle.SIDE:
            assert postings.debit_value is not None
            assert postings.credit_value is not None
            default_debit, default_credit = postings.debit_value, postings.credit_value
        debit = accounts.normal_debit_value if accounts.normal_debit_value is not None else (
            default_debit)
        credit = accounts.normal_credit_value if accounts.normal_credit_value is not None else (
            default_credit)
        return debit, credit

    def account_sign(self) -> sql.Composable:
        """+1 for a debit-normal account, -1 for credit-normal, NULL for an unknown marker."""
        assert self.config.accounts is not None
        if self.account_normal_side is None:
            sign = 1 if self.config.accounts.default_normal_side is NormalSide.DEBIT else -1
            return sql.Literal(sign)
        debit, credit = self.normal_markers()
        reference = _column_ref("a", self.account_normal_side)
        return sql.SQL("(CASE WHEN {} = {} THEN 1 WHEN {} = {} THEN -1 END)").format(
            reference, sql.Literal(debit), reference, sql.Literal(credit))

    def account_id_ref(self) -> sql.Composed:
        assert self.account_id is not None
        return _column_ref("a", self.account_id)

    def account_balance_value(self) -> sql.Composable:
        assert self.account_balance is not None
        return exact_value("a", self.account_balance)

    def header_id_ref(self) -> sql.Composed:
        assert self.header_id is not None
        return _column_ref("h", self.header_id)


def resolve_ledger(connection: psycopg.Connection[tuple[object, ...]],
                   config: LedgerConfig) -> LedgerSchema:
    """Resolve every configured table and column, raising ConfigurationError on the first gap."""
    postings_config = config.postings
    postings = find_table(connection, postings_config.table, field="postings.table")

    def postings_column(name: str | None, field: str,
                        allowed_types: frozenset[str] | None = None) -> Column | None:
        if name is None:
            return None
        return find_column(postings, name, field=field, allowed_types=allowed_types)

    transaction_id = find_column(postings, postings_config.transaction_id,
                                 field="postings.transactionId")
    amount = postings_column(postings_config.amount, "postings.amount", AMOUNT_TYPES)
    side = postings_column(postings_config.side, "postings.side")
    if side is not None:
        assert postings_config.debit_value is not None
        assert postings_config.credit_value is not None
        _check_marker_type(postings_config.debit_value, side, table=postings,
                           field="postings.debitValue")
        _check_marker_type(postings_config.credit_value, side, table=postings,
                           field="postings.creditValue")
    debit_amount = postings_column(postings_config.debit_amount, "postings.debitAmount",
                                   AMOUNT_TYPES)
    credit_amount = postings_column(postings_config.credit_amount, "postings.creditAmount",
                                    AMOUNT_TYPES)
    currency = postings_column(postings_config.currency, "postings.currency")
    account = postings_column(postings_config.account, "postings.account")
    booked_at = postings_column(postings_config.booked_at, "postings.bookedAt", DATE_TYPES)

    accounts = account_id = account_balance = account_normal_side = None
    if config.accounts is not None:
        accounts = find_table(connection, config.accounts.table, field="accounts.table")
        account_id = find_column(accounts, config.accounts.id, field="accounts.id")
        if config.accounts.balance is not None:
            account_balance = find_column(accounts, config.accounts.balance,
                                          field="accounts.balance", allowed_types=AMOUNT_TYPES)
        if config.accounts.normal_side is not None:
            account_normal_side = find_column(accounts, config.accounts.normal_side,
                                              field="accounts.normalSide")

    transactions = header_id = header_booked_at = None
    if config.transactions is not None:
        transactions = find_table(connection, config.transactions.table,
                                  field="transactions.table")
        header_id = find_column(transactions, config.transactions.id, field="transactions.id")
        if config.transactions.booked_at is not None:
            header_booked_at = find_column(transactions, config.transactions.booked_at,
                                           field="transactions.bookedAt",
                                           allowed_types=DATE_TYPES)

    schema = LedgerSchema(
        config=config, postings=postings, transaction_id=transaction_id, amount=amount,
        side=side, debit_amount=debit_amount, credit_amount=credit_amount, currency=currency,
        account=account, booked_at=booked_at, accounts=accounts, account_id=account_id,
        account_balance=account_balance, account_normal_side=account_normal_side,
        transactions=transactions, header_id=header_id, header_booked_at=header_booked_at,
    )
    if account_normal_side is not None and accounts is not None:
        debit_marker, credit_marker = schema.normal_markers()
        _check_marker_type(debit_marker, account_normal_side, table=accounts,
                           field="accounts.normalDebitValue")
        _check_marker_type(credit_marker, account_normal_side, table=accounts,
                           field="accounts.normalCreditValue")
    return schema
