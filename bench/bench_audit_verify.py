"""How many audit rows per second ``dbsync audit verify`` checks, against plain reads.

Starts a throwaway PostgreSQL (``LocalPostgres``), creates dbsync's audit tables and fills
them with ``--rows`` events through the real chaining trigger, in server-side
``INSERT ... SELECT`` batches. It then times, on the same rows, in the same run:

- ``copy-read``: the same ``COPY ... TO STDOUT`` stream that verify reads, without hashing
  (the floor: what reading the rows costs),
- ``cursor-read``: a server-side cursor that loads every column into Python values (what a
  verifier that re-serializes typed values would start from),
- ``verify``: ``verify_chain()``, which streams, hashes and checks each row.

Usage: ``python bench/bench_audit_verify.py [--rows 1000000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from dbsync.pipeline.audit import ensure_own_schema, verify_chain
from dbsync.pipeline.audit_chain import (
    AUDIT_TABLE,
    CANONICAL_COLUMN_NAMES,
    CANONICAL_COLUMNS,
    CHAIN_FORMAT,
    GENESIS_HASH,
    canonical_line,
    row_hash,
)
from dbsync.testing.postgres import LocalPostgres

GOAL_ROWS_PER_SECOND = 100_000
BATCH_OPERATIONS = 50_000

# One START and one FINISH event per operation, ten operations per sync, every twentieth
# operation failed. Values are derived from the operation number so batches are repeatable.
_FILL = """
INSERT INTO sync_audit_logs (
    event_id, event_kind, sync_id, operation_id, operation_type, operation_name, status,
    duration_ms, migration_name, trace_id, span_id, parent_span_id, service_name,
    service_version, requester_kind, requester_user, requester_host, database_host,
    database_port, database_name, metadata, error_details
)
SELECT
    gen_random_uuid(),
    kind.name,
    md5('sync' || (g / 10))::uuid,
    md5('operation' || g)::uuid,
    CASE WHEN g %% 10 = 0 THEN 'SYNC' ELSE 'REVISION' END,
    'revision ' || g,
    CASE WHEN kind.name = 'START' THEN 'STARTED'
         WHEN g %% 20 = 7 THEN 'FAILED' ELSE 'SUCCESS' END,
    CASE WHEN kind.name = 'FINISH' THEN g %% 5000 END,
    CASE WHEN g %% 10 <> 0 THEN lpad((g %% 10)::text, 4, '0') || '_change' END,
    md5('sync' || (g / 10)),
    substr(md5('span' || g), 1, 16),
    CASE WHEN g %% 10 <> 0 THEN substr(md5('span' || (g / 10 * 10)), 1, 16) END,
    'dbsync', '0.1.0', 'cli', 'bench', 'bench-host', '127.0.0.1', 5432, 'ledger',
    CASE WHEN kind.name = 'FINISH'
         THEN jsonb_build_object('revision', 'r' || g, 'rows_changed', g %% 1000) END,
    CASE WHEN kind.name = 'FINISH' AND g %% 20 = 7
         THEN jsonb_build_object('message', 'relation "accounts_' || g || '" already exists')
    END
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
CROSS JOIN (VALUES (1, 'START'), (2, 'FINISH')) AS kind(position, name)
ORDER BY g, kind.position
"""


def fill_through_trigger(dsn: str, operations: int) -> None:
    """Insert ``operations`` START/FINISH pairs through the chaining trigger."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        for first in range(1, operations + 1, BATCH_OPERATIONS):
            last = min(first + BATCH_OPERATIONS - 1, operations)
            connection.execute(_FILL, {"first": first, "last": last})


def _event_values(number: int, kind: str, *, sequence: int, prev_hash: str,
                  recorded_at: datetime) -> list[Any]:
    """Column values, in CANONICAL_COLUMN_NAMES order, of one generated event."""
    finish = kind == "FINISH"
    failed = finish and number % 20 == 7
    status = "STARTED"
    if finish:
        status = "FAILED" if failed else "SUCCESS"
    sync_hex = hashlib.md5(f"sync{number // 10}".encode()).hexdigest()
    metadata = error_details = None
    if finish:
        # PostgreSQL's jsonb text output: keys ordered by length, then bytes.
        metadata = f'{{"revision": "r{number}", "rows_changed": {number % 1000}}}'
    if failed:
        error_details = f'{{"message": "relation \\"accounts_{number}\\" already exists"}}'
    return [
        CHAIN_FORMAT, sequence, prev_hash, recorded_at, uuid.uuid4(), kind,
        uuid.UUID(sync_hex), uuid.UUID(hashlib.md5(f"operation{number}".encode()).hexdigest()),
        "SYNC" if number % 10 == 0 else "REVISION", f"revision {number}",
        status,
        number % 5000 if finish else None,
        f"{number % 10:04d}_change" if number % 10 else None,
        sync_hex, hashlib.md5(f"span{number}".encode()).hexdigest()[:16],
        (hashlib.md5(f"span{number // 10 * 10}".encode()).hexdigest()[:16]
         if number % 10 else None),
        None, "dbsync", "0.1.0", "cli", "bench", "bench-host", None, None, None, None, None,
        "127.0.0.1", 5432, "ledger", None, 4242, None, error_details, metadata,
    ]


def fill_by_copy(dsn: str, *, first_operation: int, operations: int) -> None:
    """Append ``operations`` START/FINISH pairs with COPY, chained in Python.

    The chaining trigger is disabled for the load (a superuser on a throwaway server), so
    this exercises the Python serialization: verify only passes if it matches the trigger's.
    """
    columns = sql.SQL(", ").join(sql.Identifier(name) for name in
                                 ("row_hash", *CANONICAL_COLUMN_NAMES))
    with psycopg.connect(dsn, autocommit=True) as connection:
        head = connection.execute(
            f"SELECT sequence, row_hash, recorded_at FROM {AUDIT_TABLE} "
            "ORDER BY sequence DESC LIMIT 1").fetchone()
        sequence, prev_hash, recorded_at = head if head else (0, GENESIS_HASH, datetime.now(UTC))
        connection.execute(f"ALTER TABLE {AUDIT_TABLE} DISABLE TRIGGER sync_audit_logs_chain")
        try:
            with connection.cursor() as cursor, cursor.copy(
                    sql.SQL("COPY {} ({}) FROM STDIN").format(
                        sql.Identifier(AUDIT_TABLE), columns)) as copy:
                for number in range(first_operation, first_operation + operations):
                    for kind in ("START", "FINISH"):
                        sequence += 1
                        recorded_at += timedelta(microseconds=37)
                        line = canonical_line(_event_values(
                            number, kind, sequence=sequence, prev_hash=prev_hash,
                            recorded_at=recorded_at))
                        prev_hash = row_hash(line)
                        copy.write(prev_hash.encode("ascii") + b"\t" + line + b"\n")
        finally:
            connection.execute(
                f"ALTER TABLE {AUDIT_TABLE} ENABLE ALWAYS TRIGGER sync_audit_logs_chain")
        connection.execute(f"VACUUM ANALYZE {AUDIT_TABLE}")


def copy_read(dsn: str) -> int:
    """Stream the verify query's rows without hashing; return the row count."""
    count = 0
    query = sql.SQL("COPY (SELECT row_hash, {} FROM {} ORDER BY sequence) TO STDOUT").format(
        sql.SQL(", ".join(CANONICAL_COLUMNS)), sql.Identifier(AUDIT_TABLE))
    with psycopg.connect(dsn, autocommit=True) as connection, connection.cursor() as cursor, \
            cursor.copy(query) as copy:
        for _chunk in copy:
            count += 1
    return count


def cursor_read(dsn: str) -> int:
    """Load every row into typed Python values through a server-side cursor."""
    count = 0
    with psycopg.connect(dsn) as connection, connection.cursor(name="bench") as cursor:
        cursor.itersize = 10_000
        cursor.execute(sql.SQL("SELECT * FROM {} ORDER BY sequence").format(
            sql.Identifier(AUDIT_TABLE)))
        for _row in cursor:
            count += 1
    return count


def verify(dsn: str) -> int:
    """Run the real verification; return the number of rows it checked."""
    result = verify_chain(dsn)
    if not result.ok:
        raise SystemExit(f"the generated chain does not verify: {result.render_text()}")
    return result.rows_checked


def server_cpu_seconds(server: LocalPostgres) -> float:
    """Return the CPU time used so far by the server's postmaster and all its backends.

    A backend that has exited is counted through the postmaster's cutime and cstime, which
    include every child it has reaped.
    """
    assert server.base_dir is not None
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    ticks = 0
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # Fields after the command name: state is fields[0], ppid fields[1], utime fields[11].
        pid, parent = int(pid_dir.name), int(fields[1])
        if pid == postmaster:
            ticks += sum(int(value) for value in fields[11:15])
        elif parent == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(name: str, action: Callable[[str], int], server: LocalPostgres,
            repeat: int) -> float:
    """Run ``action`` ``repeat`` times; print and return the median rows per second.

    Also prints the CPU time per row of this process and of the server, and the rate the
    slower side would allow if each had a core of its own: an estimate for an idle
    machine, because both run at the same time and overlap.
    """
    dsn = server.dsn("postgres")
    rates, client_us, server_us = [], [], []
    for _ in range(repeat):
        server_before = server_cpu_seconds(server)
        client_before = time.process_time()
        started = time.perf_counter()
        rows = action(dsn)
        elapsed = time.perf_counter() - started
        client_us.append((time.process_time() - client_before) / rows * 1e6)
        server_us.append((server_cpu_seconds(server) - server_before) / rows * 1e6)
        rates.append(rows / elapsed)
    median = statistics.median(rates)
    client = statistics.median(client_us)
    server_cost = statistics.median(server_us)
    idle_estimate = 1e6 / max(client, server_cost)
    print(f"{name:12s} {median:12,.0f} rows/s  (runs: "
          f"{', '.join(f'{rate:,.0f}' for rate in rates)}); CPU per row: client "
          f"{client:.1f} us, server {server_cost:.1f} us; idle-core estimate "
          f"{idle_estimate:,.0f} rows/s")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="events to generate")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    parser.add_argument("--trigger-rows", type=int, default=20_000,
                        help="events inserted through the chaining trigger before the COPY load")
    args = parser.parse_args()

    with LocalPostgres() as server:
        dsn = server.dsn("postgres")
        ensure_own_schema(dsn)

        # The first events go through the real trigger, which also times the write path.
        trigger_operations = min(args.trigger_rows, args.rows) // 2
        started = time.perf_counter()
        fill_through_trigger(dsn, trigger_operations)
        trigger_seconds = time.perf_counter() - started
        started = time.perf_counter()
        fill_by_copy(dsn, first_operation=trigger_operations + 1,
                     operations=(args.rows + 1) // 2 - trigger_operations)
        copy_seconds = time.perf_counter() - started

        with psycopg.connect(dsn) as connection:
            row = connection.execute(f"SELECT count(*) FROM {AUDIT_TABLE}").fetchone()
        total = int(row[0]) if row else 0
        if trigger_operations:
            print(f"trigger      {2 * trigger_operations / trigger_seconds:12,.0f} rows/s  "
                  f"(INSERT ... SELECT of {2 * trigger_operations:,} events through the "
                  "chaining trigger)")
        print(f"generated {total:,} chained events ({copy_seconds:.1f} s for the COPY part)")

        print(f"load average before measuring: {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs")
        copy_rate = measure("copy-read", copy_read, server, args.repeat)
        cursor_rate = measure("cursor-read", cursor_read, server, args.repeat)
        verify_rate = measure("verify", verify, server, args.repeat)

    print(f"verify / copy-read:   {verify_rate / copy_rate:.2f}")
    print(f"verify / cursor-read: {verify_rate / cursor_rate:.2f}")
    verdict = "meets" if verify_rate >= GOAL_ROWS_PER_SECOND else "misses"
    print(f"verify {verdict} the goal of {GOAL_ROWS_PER_SECOND:,} rows/s")


if __name__ == "__main__":
    main()
