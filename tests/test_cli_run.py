"""``dbsync run`` as users call it: a subprocess with exit codes, one-line errors, no secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbsync.testing.postgres import find_free_port
from tests.conftest import DatabasePair

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CANARY_PASSWORD = "canary-Pw-7f3a9c"


def _dbsync(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("DBSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "dbsync.cli.main", *arguments], capture_output=True, text=True,
        input=stdin, timeout=120, env=environment, check=False)


def _with_password(dsn: str, password: str) -> str:
    return make_conninfo(dsn, password=password)


def test_run_prints_report_and_exits_zero(db_pair: DatabasePair) -> None:
    """A clean sync prints the JSON report with the sync id and exits 0."""
    _dbsync("run", "--source", db_pair.source, "--target", db_pair.source,
            "--migrations", str(EXAMPLES / "migrations"))
    completed = _dbsync("run", "--source", db_pair.source, "--target", db_pair.target,
                        "--migrations", str(EXAMPLES / "migrations"), "--output", "json")

    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["result"] == "Succeeded"
    assert len(report["sync_id"]) == 36
    assert report["migration"]["revision_after"] == "0006_txn_status"


def test_request_on_stdin_runs_the_same_sync(db_pair: DatabasePair) -> None:
    """A JSON request on standard input keeps credentials off the command line."""
    request = {"source_dsn": db_pair.source, "target_dsn": db_pair.target,
               "migrations_dir": str(EXAMPLES / "migrations"), "revision": "0002_transactions"}

    completed = _dbsync("run", "--request", "-", "--output", "json", stdin=json.dumps(request))

    report = json.loads(completed.stdout)
    assert report["migration"]["revision_after"] == "0002_transactions"
    assert report["exit_code"] == completed.returncode


def _assert_one_clear_line(completed: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert completed.returncode == 2, completed.stdout + completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dbsync: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert CANARY_PASSWORD not in completed.stdout + completed.stderr


def test_malformed_dsn_exits_two(db_pair: DatabasePair) -> None:
    """A DSN that does not parse is named in one line, without its password."""
    bad = f"postgresql://user:{CANARY_PASSWORD}@host:notaport/db"

    completed = _dbsync("run", "--source", bad, "--target", db_pair.target,
                        "--migrations", str(EXAMPLES / "migrations"))

    _assert_one_clear_line(completed, "source DSN is invalid")


def test_unreachable_host_exits_two(db_pair: DatabasePair) -> None:
    """A closed port on 127.0.0.1 is reported as unreachable in one line, password hidden."""
    closed_port = find_free_port()
    unreachable = (f"postgresql://postgres:{CANARY_PASSWORD}@127.0.0.1:{closed_port}/staging")

    completed = _dbsync("run", "--source", db_pair.source, "--target", unreachable,
                        "--migrations", str(EXAMPLES / "migrations"), "--connect-timeout", "3")

    _assert_one_clear_line(completed, "cannot connect to the target database",
                           f"127.0.0.1:{closed_port}/staging")


def test_wrong_password_is_not_echoed(db_pair: DatabasePair) -> None:
    """A rejected login names the database but never the password that was tried."""
    params = conninfo_to_dict(db_pair.target)
    if not params.get("host", "").startswith("127."):
        pytest.skip("the server under test does not use password authentication")
    wrong = _with_password(db_pair.target, CANARY_PASSWORD)

    completed = _dbsync("run", "--source", db_pair.source, "--target", wrong,
                        "--migrations", str(EXAMPLES / "migrations"))

    _assert_one_clear_line(completed, "cannot connect to the target database")


def test_missing_migrations_directory_exits_two(db_pair: DatabasePair, tmp_path: Path) -> None:
    """A migrations path that does not exist is named before any database is touched."""
    missing = tmp_path / "no-such-dir"
    source = _with_password(db_pair.source, CANARY_PASSWORD)

    completed = _dbsync("run", "--source", source, "--target", db_pair.target,
                        "--migrations", str(missing))

    _assert_one_clear_line(completed, str(missing))


def test_missing_target_option_exits_two() -> None:
    """Forgetting --target is a usage error that says how to fix it."""
    completed = _dbsync("run", "--source", "postgresql://localhost/x")

    _assert_one_clear_line(completed, "--target")
