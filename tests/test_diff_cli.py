"""The ``dbsync diff`` command: exit codes, text and JSON output, options and errors."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from dbsync.cli.main import main
from dbsync.testing.servers import TestServer
from tests.conftest import DatabasePair
from tests.test_diff import built_pair

DBSYNC = Path("/work/venv/bin/dbsync")

SOURCE_SQL = "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text)"
TARGET_SQL = SOURCE_SQL + "; ALTER TABLE accounts ADD COLUMN nickname text"


@pytest.fixture(scope="module")
def drifted(pg: TestServer) -> Iterator[DatabasePair]:
    """A source and a target with one extra column."""
    with built_pair(pg, source_sql=SOURCE_SQL, target_sql=TARGET_SQL) as pair:
        yield pair


@contextmanager
def no_environment_dsns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("DBSYNC_SOURCE_DSN", raising=False)
    monkeypatch.delenv("DBSYNC_TARGET_DSN", raising=False)
    yield


def test_same_database_exits_zero(drifted: DatabasePair,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A database compared with itself exits 0 and prints that nothing differs."""
    code = main(["diff", "--source", drifted.source, "--target", drifted.source])

    assert code == 0
    assert "Schema diff: no differences" in capsys.readouterr().out


def test_differences_exit_one_with_text(drifted: DatabasePair,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Differences exit 1 and are listed one per line."""
    code = main(["diff", "--source", drifted.source, "--target", drifted.target])

    output = capsys.readouterr().out
    assert code == 1
    assert "[destructive] column public.accounts.nickname: only in target" in output


def test_json_output(drifted: DatabasePair, capsys: pytest.CaptureFixture[str]) -> None:
    """--output json prints the summary and the differences."""
    code = main(["diff", "--source", drifted.source, "--target", drifted.target,
                 "--output", "json"])

    document = json.loads(capsys.readouterr().out)
    assert code == 1
    assert document["summary"]["columns"] == {"source": 2, "target": 3}
    assert document["differences"] == [{
        "kind": "column", "name": "public.accounts.nickname", "property": "exists",
        "source": "absent", "target": "present", "hazard": "destructive",
        "severity": "normal"}]


def test_ignore_pattern_option(drifted: DatabasePair) -> None:
    """--ignore with a glob on the table leaves its columns out."""
    code = main(["diff", "--source", drifted.source, "--target", drifted.target,
                 "--ignore", "public.acc*"])

    assert code == 0


def test_ignore_kind_option(drifted: DatabasePair) -> None:
    """--ignore-kind column leaves column differences out."""
    code = main(["diff", "--source", drifted.source, "--target", drifted.target,
                 "--ignore-kind", "column"])

    assert code == 0


def test_ignore_schema_option(drifted: DatabasePair) -> None:
    """--ignore-schema public leaves the public schema out."""
    code = main(["diff", "--source", drifted.source, "--target", drifted.target,
                 "--ignore-schema", "public"])

    assert code == 0


def test_dsns_from_environment(drifted: DatabasePair, monkeypatch: pytest.MonkeyPatch) -> None:
    """DBSYNC_SOURCE_DSN and DBSYNC_TARGET_DSN stand in for --source and --target."""
    monkeypatch.setenv("DBSYNC_SOURCE_DSN", drifted.source)
    monkeypatch.setenv("DBSYNC_TARGET_DSN", drifted.target)

    assert main(["diff"]) == 1


def test_missing_source_exits_two(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without a source DSN the command exits 2 and names the option."""
    with no_environment_dsns(monkeypatch):
        code = main(["diff", "--target", "postgresql://localhost/x"])

    assert code == 2
    assert "--source" in capsys.readouterr().err


def test_unreachable_database_exits_two(drifted: DatabasePair,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A database that cannot be reached exits 2 with a redacted one-line error."""
    target = make_conninfo(drifted.target, dbname="missing_diff_database",
                           password="cli-secret-77")

    code = main(["diff", "--source", drifted.source, "--target", target])

    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("dbsync: error: cannot connect to the target database")
    assert "cli-secret-77" not in error


def test_unknown_kind_exits_two() -> None:
    """An unknown --ignore-kind is a usage error."""
    with pytest.raises(SystemExit) as raised:
        main(["diff", "--source", "a", "--target", "b", "--ignore-kind", "tablez"])

    assert raised.value.code == 2


def test_console_script_reports_differences(drifted: DatabasePair) -> None:
    """The installed dbsync script exits 1 and prints JSON for a drifted target."""
    completed = subprocess.run(
        [str(DBSYNC), "diff", "--output", "json"],
        env={"DBSYNC_SOURCE_DSN": drifted.source, "DBSYNC_TARGET_DSN": drifted.target,
             "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, check=False)

    assert completed.returncode == 1, completed.stderr
    assert json.loads(completed.stdout)["differences"][0]["name"] == "public.accounts.nickname"
