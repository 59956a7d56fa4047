"""Ledger fixtures shared by the ledger test modules: one builder per ledger style.

Every builder writes the same balanced books into its own schema, so a test can break one
invariant with a single call and expect exactly one check to fail.  Amounts are signed
strings: positive for a debit, negative for a credit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

from dbsync.pipeline.ledger import LedgerConfig, parse_ledger_config
from dbsync.testing.servers import TestServer

STYLES = ("side", "signed", "debit_credit_columns")

# (account id, stored balance, normal side)
BASE_ACCOUNTS = ((1, "100.00", "D"), (2, "100.00", "C"), (3, "50.25", "D"), (4, "50.25", "C"),
                 (5, "0", "D"))

# (transaction id, [(account id, currency, signed amount)])
BASE_TRANSACTIONS: tuple[tuple[int, list[tuple[int, str, str]]], ...] = (
    (1, [(1, "USD", "100.00"), (2, "USD", "-100.00")]),
    (2, [(3, "EUR", "50.25"), (4, "EUR", "-50.25")]),
)

Leg = tuple[int, str | None, str | None]


@dataclass
class LedgerBooks:
    """A ledger of one style in its own schema of the module's database."""

    dsn: str
    schema: str
    style: str
    amount_type: str = "numeric(18,2)"

    @property
    def postings_table(self) -> str:
        return {"side": "postings", "signed": "entries",
                "debit_credit_columns": "move_lines"}[self.style]

    _connection: psycopg.Connection[Any] | None = field(default=None, repr=False)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run every execute() inside the block on one connection, saving logins."""
        if self._connection is not None:
            yield
            return
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            self._connection = connection
            try:
                yield
            finally:
                self._connection = None

    def execute(self, statement: str | sql.Composed, params: Sequence[Any] = ()) -> None:
        if self._connection is not None:
            self._connection.execute(statement, params)
            return
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(statement, params)

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(sql.SQL("SET search_path TO {}").format(
                sql.Identifier(self.schema)))
            return connection.execute(statement, params).fetchall()

    def create(self) -> None:
        """Create the schema, the three tables and the balanced base books."""
        schema = sql.Identifier(self.schema)
        amount_type = sql.SQL(self.amount_type)
        statements = [
            sql.SQL("CREATE SCHEMA {}").format(schema),
            sql.SQL("CREATE TABLE {}.accounts (id integer PRIMARY KEY, balance numeric, "
                    "normal_side text)").format(schema),
            sql.SQL("CREATE TABLE {}.transactions (id bigint PRIMARY KEY, created_at "
                    "timestamptz NOT NULL DEFAULT '2026-01-05 10:00+00')").format(schema),
        ]
        if self.style == "side":
            statements.append(sql.SQL(
                "CREATE TABLE {}.postings (id bigserial PRIMARY KEY, transaction_id bigint, "
                "amount {}, side text, currency char(3), account_id integer)"
            ).format(schema, amount_type))
        elif self.style == "signed":
            statements.append(sql.SQL(
                "CREATE TABLE {}.entries (id bigserial PRIMARY KEY, txn_id bigint, "
                "amount {}, currency char(3), account_id integer)").format(schema, amount_type))
        else:
            statements.append(sql.SQL(
                "CREATE TABLE {}.move_lines (id bigserial PRIMARY KEY, move_id bigint, "
                "debit {}, credit {}, currency char(3), account_id integer)"
            ).format(schema, amount_type, amount_type))
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            for statement in statements:
                connection.execute(statement)
            for account_id, balance, normal_side in BASE_ACCOUNTS:
                connection.execute(
                    sql.SQL("INSERT INTO {}.accounts VALUES (%s, %s, %s)").format(schema),
                    (account_id, balance, normal_side))
        with self.batch():
            for transaction_id, legs in BASE_TRANSACTIONS:
                self.add_transaction(transaction_id, legs, update_balances=False)

    def insert_leg(self, transaction_id: int | None, account_id: int | None,
                   currency: str | None, amount: str | None) -> None:
        """Insert one posting row in this style; a None amount stores NULL amounts."""
        schema = sql.Identifier(self.schema)
        if self.style == "side":
            # A NULL amount still gets a valid side, so only the amount rule fires.
            side = "C" if amount is not None and amount.startswith("-") else "D"
            magnitude = None if amount is None else amount.lstrip("-")
            self.execute(sql.SQL("INSERT INTO {}.postings (transaction_id, amount, side, "
                                 "currency, account_id) VALUES (%s, %s, %s, %s, %s)").format(
                schema), (transaction_id, magnitude, side, currency, account_id))
        elif self.style == "signed":
            self.execute(sql.SQL("INSERT INTO {}.entries (txn_id, amount, currency, "
                                 "account_id) VALUES (%s, %s, %s, %s)").format(schema),
                         (transaction_id, amount, currency, account_id))
        else:
            debit: str | None = None
            credit: str | None = None
            if amount is not None:
                debit = "0" if amount.startswith("-") else amount
                credit = amount.lstrip("-") if amount.startswith("-") else "0"
            self.execute(sql.SQL("INSERT INTO {}.move_lines (move_id, debit, credit, "
                                 "currency, account_id) VALUES (%s, %s, %s, %s, %s)").format(
                schema), (transaction_id, debit, credit, currency, account_id))

    def add_transaction(self, transaction_id: int, legs: Sequence[Leg], *, header: bool = True,
                        update_balances: bool = True) -> None:
        """Post ``legs`` as one transaction and keep the stored balances in step."""
        schema = sql.Identifier(self.schema)
        with self.batch():
            if header:
                self.execute(sql.SQL("INSERT INTO {}.transactions (id) VALUES (%s)").format(
                    schema), (transaction_id,))
            for account_id, currency, amount in legs:
                self.insert_leg(transaction_id, account_id, currency, amount)
                if update_balances and amount is not None:
                    self.execute(sql.SQL(
                        "UPDATE {}.accounts SET balance = balance + CASE WHEN normal_side = "
                        "'D' THEN %s::numeric ELSE -%s::numeric END WHERE id = %s").format(
                            schema), (amount, amount, account_id))

    def config_data(self, **top_level: Any) -> dict[str, Any]:
        """Return the YAML-shaped configuration for this ledger, in camelCase."""
        postings: dict[str, Any] = {"table": f"{self.schema}.{self.postings_table}",
                                    "style": self.style, "currency": "currency",
                                    "account": "account_id"}
        if self.style == "side":
            postings.update(transactionId="transaction_id", amount="amount", side="side",
                            debitValue="D", creditValue="C")
        elif self.style == "signed":
            postings.update(transactionId="txn_id", amount="amount")
        else:
            postings.update(transactionId="move_id", debitAmount="debit",
                            creditAmount="credit")
        data: dict[str, Any] = {
            "postings": postings,
            "accounts": {"table": f"{self.schema}.accounts", "id": "id", "balance": "balance",
                         "normalSide": "normal_side", "normalDebitValue": "D",
                         "normalCreditValue": "C"},
            "transactions": {"table": f"{self.schema}.transactions", "id": "id",
                             "bookedAt": "created_at"},
            "fingerprint": {"dateSource": "transactions"},
        }
        data.update(top_level)
        return data

    def config(self, **top_level: Any) -> LedgerConfig:
        return parse_ledger_config(self.config_data(**top_level), origin="test configuration")


@pytest.fixture(scope="module")
def ledger_dsn(pg: TestServer) -> Iterator[str]:
    """One database per test module; each test gets its own schema in it."""
    name = pg.create_database("ledger")
    yield pg.dsn(name)
    pg.drop_database(name)


def new_schema_name() -> str:
    return f"books_{uuid.uuid4().hex[:10]}"


def make_books(dsn: str, style: str, *, amount_type: str = "numeric(18,2)",
               schema: str | None = None) -> LedgerBooks:
    """Create balanced books of ``style`` in a fresh schema of ``dsn``."""
    books = LedgerBooks(dsn=dsn, schema=schema or new_schema_name(), style=style,
                        amount_type=amount_type)
    books.create()
    return books
