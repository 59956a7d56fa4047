"""Benchmark of the ledger checks against a plain scan of the same postings table.

Generates a side-column ledger (two legs per transaction, three currencies) on a throwaway
``LocalPostgres``, then times, in the same run:

1. the baseline ``SELECT count(*), sum(amount) FROM postings``;
2. two grouping floors, split into the same parallel transaction ranges as dbsync's
   shared pass: only ``count(*)`` per transaction, then only ``sum(amount)`` per
   transaction.  An exact per-transaction balance check groups every transaction and sums
   its amounts, so it cannot do less work than the second floor, and its ratio bounds
   what any such check can reach in PostgreSQL;
3. dbsync's ``transaction_balance`` plus ``trial_balance`` checks;
4. dbsync's full default set (without a source, so fingerprint is skipped);

first without and then with the recommended covering index, and prints each time as a
ratio to the baseline.  Goals: at most 1.5 for step 3 and at most 3 for step 4.

Usage: ``python bench/bench_ledger.py [--rows 10000000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import psycopg

from dbsync.pipeline.ledger import CheckStatus, LedgerConfig, run_ledger_checks
from dbsync.pipeline.ledger_checks import transaction_ranges
from dbsync.pipeline.ledger_config import parse_ledger_config
from dbsync.pipeline.ledger_sql import resolve_ledger
from dbsync.testing.postgres import LocalPostgres

ACCOUNTS = 1000

SCHEMA = """
CREATE TABLE accounts (id integer PRIMARY KEY, balance numeric NOT NULL,
                       normal_side text NOT NULL);
CREATE TABLE transactions (id bigint PRIMARY KEY, created_at timestamptz NOT NULL);
CREATE TABLE postings (id bigint PRIMARY KEY, transaction_id bigint NOT NULL,
                       amount numeric(18,2) NOT NULL, side text NOT NULL,
                       currency char(3) NOT NULL, account_id integer NOT NULL);
"""

# Leg 2n debits account n mod 1000, leg 2n+1 credits account (n + 7) mod 1000.
FILL = """
INSERT INTO postings
SELECT g, g / 2, ((g / 2) % 99991) / 100.0 + 0.01,
       CASE WHEN g % 2 = 0 THEN 'D' ELSE 'C' END,
       (ARRAY['USD', 'EUR', 'GBP'])[(g / 2) % 3 + 1],
       CASE WHEN g % 2 = 0 THEN (g / 2) % {accounts} ELSE ((g / 2) + 7) % {accounts} END
FROM generate_series(0, {rows} - 1) AS g;
INSERT INTO transactions
SELECT t, timestamptz '2026-01-01 00:00+00' + t * interval '1 second'
FROM generate_series(0, {rows} / 2 - 1) AS t;
INSERT INTO accounts
SELECT a, coalesce(sum(CASE p.side WHEN 'D' THEN p.amount ELSE -p.amount END), 0), 'D'
FROM generate_series(0, {accounts} - 1) AS a LEFT JOIN postings AS p ON p.account_id = a
GROUP BY a;
"""

COVERING_INDEX = ("CREATE INDEX postings_ledger_check ON postings (transaction_id, currency) "
                  "INCLUDE (side, amount)")

BASELINE = "SELECT count(*), sum(amount) FROM postings"


def ledger_config(checks: list[str] | None) -> LedgerConfig:
    return parse_ledger_config({
        "postings": {"table": "postings", "style": "side", "transactionId": "transaction_id",
                     "amount": "amount", "side": "side", "debitValue": "D",
                     "creditValue": "C", "currency": "currency", "account": "account_id"},
        "accounts": {"table": "accounts", "balance": "balance", "normalSide": "normal_side"},
        "transactions": {"table": "transactions", "bookedAt": "created_at"},
        "checks": checks,
        "statementTimeoutMs": 3_600_000,
    }, origin="benchmark configuration")


def grouping_floor_query(dsn: str, aggregate: str) -> str:
    """Compute ``aggregate`` per transaction, in the ranges dbsync's shared pass would use.

    The outer count of groups whose value is zero keeps PostgreSQL from dropping the
    aggregate as unused.
    """
    with psycopg.connect(dsn, autocommit=True) as connection:
        schema = resolve_ledger(connection, ledger_config(None))
        ranges = transaction_ranges(schema, connection)
    branches = []
    for start, stop in ranges:
        conditions = [f"transaction_id >= {start}" if start is not None else "true",
                      f"transaction_id < {stop}" if stop is not None else "true"]
        branches.append(
            "SELECT count(*) FILTER (WHERE t.value = 0) AS zero FROM (SELECT transaction_id, "
            f"{aggregate} AS value FROM postings WHERE {' AND '.join(conditions)} "
            "GROUP BY transaction_id) AS t")
    return f"SELECT sum(zero) FROM ({' UNION ALL '.join(branches)}) AS b"


def median_seconds(action: Callable[[], None], repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def measure(dsn: str, repeat: int, label: str) -> dict[str, float]:
    """Time the baseline, the balance pair and the default set; print and return seconds.

    The baseline runs before, between and after the dbsync runs, and its median is the
    divisor, so that load from other processes on a shared machine skews it less.
    """
    baseline_timings: list[float] = []

    def baseline() -> None:
        with psycopg.connect(dsn, autocommit=True) as connection:
            for _ in range(repeat):
                started = time.perf_counter()
                connection.execute(BASELINE).fetchall()
                baseline_timings.append(time.perf_counter() - started)

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(BASELINE)  # warm the cache once before timing anything

    def run_checks(checks: list[str] | None) -> Callable[[], None]:
        config = ledger_config(checks)

        def action() -> None:
            result = run_ledger_checks(target_dsn=dsn, config=config)
            bad = [check for check in result.checks
                   if check.status not in (CheckStatus.PASS, CheckStatus.SKIPPED)]
            if bad:
                raise SystemExit(f"benchmark ledger did not pass: {result.render_text()}")
            per_check.update({check.name.value: check.duration_ms / 1000.0
                              for check in result.checks})
        return action

    per_check: dict[str, float] = {}
    baseline()
    def grouping_floor(aggregate: str) -> Callable[[], None]:
        query = grouping_floor_query(dsn, aggregate)

        def action() -> None:
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute(query).fetchall()
        return action

    count_floor_seconds = median_seconds(grouping_floor("count(*)"), repeat)
    sum_floor_seconds = median_seconds(grouping_floor("sum(amount)"), repeat)
    pair_seconds = median_seconds(run_checks(["transaction_balance", "trial_balance"]), repeat)
    baseline()
    full_seconds = median_seconds(run_checks(None), repeat)
    baseline()
    baseline_seconds = statistics.median(baseline_timings)

    print(f"\n{label}")
    print(f"  baseline count+sum scan          {baseline_seconds:8.2f} s  (runs: "
          f"{', '.join(f'{seconds:.2f}' for seconds in baseline_timings)})")
    print(f"  floor: count(*) per transaction  {count_floor_seconds:8.2f} s  "
          f"ratio {count_floor_seconds / baseline_seconds:5.2f}")
    print(f"  floor: sum(amount) per txn       {sum_floor_seconds:8.2f} s  "
          f"ratio {sum_floor_seconds / baseline_seconds:5.2f}")
    print(f"  transaction_balance+trial        {pair_seconds:8.2f} s  "
          f"ratio {pair_seconds / baseline_seconds:5.2f}  (goal <= 1.5)")
    print(f"  full default set                 {full_seconds:8.2f} s  "
          f"ratio {full_seconds / baseline_seconds:5.2f}  (goal <= 3)")
    for name, seconds in per_check.items():
        print(f"    {name:<30} {seconds:8.2f} s  ratio {seconds / baseline_seconds:5.2f}")
    return {"baseline": baseline_seconds, "count_floor": count_floor_seconds,
            "sum_floor": sum_floor_seconds, "pair": pair_seconds, "full": full_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000,
                        help="number of postings to generate (default: 10,000,000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per measurement; the median is reported (default: 3)")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}")
    with LocalPostgres() as server:
        dsn = server.dsn("postgres")
        with psycopg.connect(dsn, autocommit=True) as connection:
            version = connection.execute("SHOW server_version").fetchone()
            print(f"PostgreSQL {version[0] if version else '?'}, {args.rows:,} postings, "
                  f"median of {args.repeat} run{'' if args.repeat == 1 else 's'}")
            started = time.perf_counter()
            connection.execute(SCHEMA)
            connection.execute(FILL.format(rows=args.rows, accounts=ACCOUNTS))
            connection.execute("VACUUM (ANALYZE) postings, transactions, accounts")
            print(f"generated in {time.perf_counter() - started:.1f} s")

        measure(dsn, args.repeat, "without covering index")

        with psycopg.connect(dsn, autocommit=True) as connection:
            started = time.perf_counter()
            connection.execute(COVERING_INDEX)
            connection.execute("VACUUM (ANALYZE) postings")
            print(f"\ncovering index built in {time.perf_counter() - started:.1f} s: "
                  f"{COVERING_INDEX}")
        measure(dsn, args.repeat, "with covering index")


if __name__ == "__main__":
    main()
