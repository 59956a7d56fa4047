"""Shared pieces of the reliability scenarios: gated revisions, `dbsync run` children, probes.

A gated revision blocks on an advisory lock that the test holds (a gate), so a test can tell
exactly which statement a sync is executing before it kills the process. The probes read
``pg_stat_activity``, ``pg_locks``, the application's ``alembic_version`` and dbsync's audit
view on sessions whose ``application_name`` is :data:`PROBE_APPLICATION`, so they never count
themselves as the sync under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo

PROBE_APPLICATION = "reliability probe"
# Advisory lock class of the gates; each revision's gate key is its number.
GATE_CLASS = 7_354_001
# The audit chain trigger serializes writers with pg_advisory_xact_lock(class, key): holding
# it in an open transaction parks every audit insert (see migrations/versions/0001_audit_log.py).
AUDIT_CHAIN_LOCK = (1_684_173_665, 1)
REVISION_COUNT = 5
# Revisions that lock the gate wait this long at most before their lock_timeout fires.
GATED_LOCK_TIMEOUT_MS = 120_000
_RESULT = TypeVar("_RESULT")


def revision_id(number: int) -> str:
    """Return the id of the ``number``-th gated revision (1-based)."""
    return f"r{number:02d}"


def _revision_file(number: int, *, non_transactional: bool) -> str:
    previous = repr(revision_id(number - 1)) if number > 1 else "None"
    gate = (f"SELECT pg_advisory_lock_shared({GATE_CLASS}, {number}), "
            f"pg_advisory_unlock_shared({GATE_CLASS}, {number}) /* reliability gate {number} */")
    if non_transactional:
        # What an autocommit block did before a crash stays committed, so such a revision
        # must be safe to run again (IF NOT EXISTS), as a real CONCURRENTLY build must be.
        body = f"""
    with op.get_context().autocommit_block():
        op.execute("CREATE TABLE IF NOT EXISTS marker_{number:02d} (id integer)")
        op.execute("{gate}")
"""
    else:
        body = f"""
    op.execute("CREATE TABLE marker_{number:02d} (id integer)")
    op.execute("{gate}")
"""
    return textwrap.dedent(f'''\
        """Gated reliability revision {number}.

        Revision ID: {revision_id(number)}
        Revises: {previous.strip("'")}
        """

        from alembic import op

        revision = {revision_id(number)!r}
        down_revision = {previous}
        branch_labels = None
        depends_on = None


        def upgrade() -> None:
        ''') + body + textwrap.dedent(f'''

        def downgrade() -> None:
            op.execute("DROP TABLE marker_{number:02d}")
        ''')


def write_gated_revisions(directory: Path, *, non_transactional: Sequence[int] = ()) -> Path:
    """Write :data:`REVISION_COUNT` gated revisions into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for number in range(1, REVISION_COUNT + 1):
        text = _revision_file(number, non_transactional=number in non_transactional)
        (directory / f"{revision_id(number)}_gated.py").write_text(text, encoding="utf-8")
    return directory


def probe(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """Open an autocommit connection that the scenarios' activity queries leave out."""
    return psycopg.connect(make_conninfo(dsn, application_name=PROBE_APPLICATION),
                           autocommit=True)


@contextmanager
def held_gates(dsn: str, numbers: Sequence[int]) -> Iterator[Callable[[int], None]]:
    """Hold the gates of ``numbers``; the yielded function opens one gate."""
    with probe(dsn) as connection:
        for number in numbers:
            connection.execute("SELECT pg_advisory_lock(%s, %s)", (GATE_CLASS, number))

        def release(number: int) -> None:
            connection.execute("SELECT pg_advisory_unlock(%s, %s)", (GATE_CLASS, number))

        yield release
        connection.execute("SELECT pg_advisory_unlock_all()")


@contextmanager
def held_audit_chain(dsn: str) -> Iterator[None]:
    """Hold the audit chain's transaction lock, so every audit insert waits."""
    with probe(dsn) as connection, connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", AUDIT_CHAIN_LOCK)
        yield


def wait_until(check: Callable[[], _RESULT | None], *, timeout_seconds: float,
               description: str, interval_seconds: float = 0.05) -> _RESULT:
    """Poll ``check`` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_seconds} s waiting for {description}")
        time.sleep(interval_seconds)


def sync_sessions(dsn: str) -> list[dict[str, Any]]:
    """Return the sessions on ``dsn``'s database other than probes and this test's own."""
    with probe(dsn) as connection:
        cursor = connection.execute(
            "SELECT pid, application_name, state, wait_event_type, wait_event, query "
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND application_name <> %s "
            "AND backend_type = 'client backend'", (PROBE_APPLICATION,))
        columns = [column.name for column in cursor.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def session_waiting_on(dsn: str, fragment: str) -> dict[str, Any] | None:
    """Return a sync session waiting for an advisory lock in a statement with ``fragment``."""
    for session in sync_sessions(dsn):
        if session["wait_event"] == "advisory" and fragment in (session["query"] or ""):
            return session
    return None


def advisory_locks(dsn: str) -> list[tuple[int, int, str]]:
    """Return (classid, objid, mode) of every advisory lock on ``dsn``'s database."""
    with probe(dsn) as connection:
        rows = connection.execute(
            "SELECT classid::bigint, objid::bigint, mode FROM pg_locks "
            "WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchall()
    return [(int(row[0]), int(row[1]), str(row[2])) for row in rows]


def marker_tables(dsn: str) -> list[str]:
    """Return the names of the gated revisions' marker tables that exist."""
    with probe(dsn) as connection:
        rows = connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename LIKE 'marker\\_%' ORDER BY tablename").fetchall()
    return [str(row[0]) for row in rows]


def applied_revision(dsn: str) -> str | None:
    """Return the single row of ``alembic_version``, or None when there is none."""
    with probe(dsn) as connection:
        exists = connection.execute("SELECT to_regclass('public.alembic_version')").fetchone()
        if exists is None or exists[0] is None:
            return None
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    if len(rows) > 1:
        raise AssertionError(f"alembic_version has several rows: {rows}")
    return str(rows[0][0]) if rows else None


def audit_operations(dsn: str, sync_id: str) -> list[dict[str, Any]]:
    """Return one sync's rows of ``sync_audit_operations`` in start order."""
    with probe(dsn) as connection:
        exists = connection.execute("SELECT to_regclass('sync_audit_operations')").fetchone()
        if exists is None or exists[0] is None:
            return []
        cursor = connection.execute(
            "SELECT operation_type, operation_name, status, metadata, error_details "
            "FROM sync_audit_operations WHERE sync_id = %s ORDER BY start_sequence",
            (sync_id,))
        columns = [column.name for column in cursor.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def checksum_revisions(dsn: str, sync_id: str) -> list[str]:
    """Return the revisions whose checksum row ``sync_id`` wrote with their migration."""
    with probe(dsn) as connection:
        exists = connection.execute(
            "SELECT to_regclass('dbsync_revision_checksums')").fetchone()
        if exists is None or exists[0] is None:
            return []
        rows = connection.execute(
            "SELECT revision FROM dbsync_revision_checksums WHERE sync_id = %s "
            "ORDER BY revision", (sync_id,)).fetchall()
    return [str(row[0]) for row in rows]


def child_environment() -> dict[str, str]:
    """Return this process's environment without DBSYNC_ variables, for `dbsync` children."""
    return {key: value for key, value in os.environ.items() if not key.startswith("DBSYNC_")}


def start_run(request: dict[str, Any], *, output_path: Path) -> subprocess.Popen[bytes]:
    """Start ``dbsync run --request - --output json`` with ``request`` on standard input.

    Standard output and standard error both go to ``output_path``, so the secret-leak
    checks can read everything the child printed.
    """
    with output_path.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "dbsync.cli.main", "run", "--request", "-",
             "--output", "json"],
            stdin=subprocess.PIPE, stdout=output, stderr=output, env=child_environment())
    assert process.stdin is not None
    process.stdin.write(json.dumps(request).encode("utf-8"))
    process.stdin.close()
    return process


@dataclass(frozen=True)
class RunOutcome:
    """The exit code and JSON report of one finished `dbsync run`."""

    exit_code: int
    report: dict[str, Any]
    stdout: str
    stderr: str


def run_to_end(request: dict[str, Any], *, timeout_seconds: float = 120.0) -> RunOutcome:
    """Run ``dbsync run --request - --output json`` to its end and parse the report."""
    completed = subprocess.run(
        [sys.executable, "-m", "dbsync.cli.main", "run", "--request", "-", "--output", "json"],
        input=json.dumps(request), capture_output=True, text=True, timeout=timeout_seconds,
        env=child_environment(), check=False)
    # The report is one (indented) JSON document; log lines go to standard error.
    start = completed.stdout.find("{")
    report: dict[str, Any] = json.loads(completed.stdout[start:]) if start >= 0 else {}
    return RunOutcome(exit_code=completed.returncode, report=report, stdout=completed.stdout,
                      stderr=completed.stderr)


def record_figure(area: str, figures: dict[str, Any]) -> None:
    """Append ``figures`` under ``area`` to $RELIABILITY_FIGURES_PATH when it is set.

    bench/reliability.py sets the variable, runs the scenarios and prints the file.
    """
    location = os.environ.get("RELIABILITY_FIGURES_PATH")
    if not location:
        return
    with open(location, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**figures, "area": area}) + "\n")
