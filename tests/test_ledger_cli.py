"""``dbsync ledger`` on real PostgreSQL: output formats and exit codes 0, 1 and 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg import sql

from dbsync.cli.main import main
from tests.test_ledger_helpers import LedgerBooks, ledger_dsn, make_books

__all__ = ["ledger_dsn"]

DBSYNC = "/work/venv/bin/dbsync"


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "ledger.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def books(ledger_dsn: str) -> LedgerBooks:
    return make_books(ledger_dsn, "side")


def test_balanced_ledger_exits_zero(books: LedgerBooks, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Balanced books exit 0 and the text output reports them balanced."""
    config = write_config(tmp_path, books.config_data())
    code = main(["ledger", "--target", books.dsn, "--config", str(config)])
    output = capsys.readouterr().out
    assert code == 0, output
    assert output.startswith("ledger: balanced")


def test_unbalanced_ledger_exits_one_without_amounts(
        books: LedgerBooks, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unbalanced transaction exits 1; JSON names it but carries no amount by default."""
    books.add_transaction(3, [(1, "USD", "10.00"), (2, "USD", "-9.99")])
    config = write_config(tmp_path, books.config_data())
    code = main(["ledger", "--target", books.dsn, "--config", str(config), "--output", "json",
                 "--checks", "transaction_balance,trial_balance"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["failed_checks"] == ["transaction_balance", "trial_balance"]
    assert report["checks"][0]["offending_keys"] == ["3/USD"]
    assert "details" not in report["checks"][0]


def test_include_amounts_adds_details(books: LedgerBooks, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--include-amounts adds the exact imbalance to the JSON output."""
    books.add_transaction(3, [(1, "USD", "10.00"), (2, "USD", "-9.99")])
    config = write_config(tmp_path, books.config_data())
    main(["ledger", "--target", books.dsn, "--config", str(config), "--output", "json",
          "--checks", "transaction_balance", "--include-amounts"])
    report = json.loads(capsys.readouterr().out)
    assert report["checks"][0]["details"]["unbalanced"][0]["net"] == "0.01"


def test_timeout_exits_one(books: LedgerBooks, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """A check forced past its statement timeout reports TIMEOUT and exits 1."""
    schema = sql.Identifier(books.schema)
    books.execute(sql.SQL(
        "CREATE VIEW {}.slow_postings AS SELECT p.* FROM {}.postings AS p "
        "CROSS JOIN LATERAL (SELECT pg_sleep(0.2)) AS pause").format(schema, schema))
    data = books.config_data(checks=["trial_balance"], statementTimeoutMs=50)
    data["postings"]["table"] = f"{books.schema}.slow_postings"
    config = write_config(tmp_path, data)
    code = main(["ledger", "--target", books.dsn, "--config", str(config), "--output", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["checks"][0]["status"] == "TIMEOUT"


def test_unknown_column_exits_two_with_one_line(books: LedgerBooks, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown column exits 2 with one error line naming it."""
    data = books.config_data()
    data["postings"]["currency"] = "ccy"
    config = write_config(tmp_path, data)
    code = main(["ledger", "--target", books.dsn, "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "column 'ccy' (postings.currency) not found" in captured.err


def test_bad_yaml_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Invalid YAML exits 2 naming the file and line, before any connection."""
    config = tmp_path / "ledger.yaml"
    config.write_text("postings:\n  table: [unclosed\n", encoding="utf-8")
    code = main(["ledger", "--target", "postgresql://nobody@127.0.0.1:1/none",
                 "--config", str(config)])
    error = capsys.readouterr().err
    assert code == 2
    assert f"{config} is not valid YAML at line" in error


def test_unknown_check_name_exits_two(books: LedgerBooks, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--checks with an unknown name exits 2 and lists the valid names."""
    config = write_config(tmp_path, books.config_data())
    code = main(["ledger", "--target", books.dsn, "--config", str(config),
                 "--checks", "transaction_balance,balance_sheet"])
    error = capsys.readouterr().err
    assert code == 2
    assert "balance_sheet" in error
    assert "trial_balance" in error


def test_unreachable_target_hides_password(tmp_path: Path, books: LedgerBooks,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable target exits 2 and the message carries no password."""
    config = write_config(tmp_path, books.config_data())
    code = main(["ledger", "--target", "postgresql://app:s3cret-pw@127.0.0.1:1/ledger",
                 "--config", str(config)])
    error = capsys.readouterr().err
    assert code == 2
    assert "s3cret-pw" not in error


def test_fingerprint_from_command_line(ledger_dsn: str, books: LedgerBooks, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--source enables the fingerprint check; comparing a ledger with itself passes."""
    config = write_config(tmp_path, books.config_data(checks=["fingerprint"]))
    code = main(["ledger", "--target", books.dsn, "--source", ledger_dsn,
                 "--config", str(config), "--output", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["checks"][0]["status"] == "PASS"


def test_installed_command_runs_as_subprocess(books: LedgerBooks, tmp_path: Path) -> None:
    """The installed dbsync executable runs the ledger command and exits 1 on a failure."""
    books.add_transaction(6, [(1, "USD", "10.00"), (4, "EUR", "-10.00")])
    config = write_config(tmp_path, books.config_data())
    completed = subprocess.run(
        [DBSYNC, "ledger", "--target", books.dsn, "--config", str(config), "--output", "json",
         "--checks", "mixed_currency,orphans"],
        capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 1, completed.stderr
    report = json.loads(completed.stdout)
    assert report["checks"][0]["offending_keys"] == ["6"]
    assert report["checks"][1]["status"] == "PASS"


def test_check_error_without_failure_exits_two(books: LedgerBooks, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A check that cannot run, with no check failing, exits 2."""
    books.execute(sql.SQL("ALTER TABLE {}.accounts ALTER COLUMN id TYPE text").format(
        sql.Identifier(books.schema)))
    config = write_config(tmp_path, books.config_data(checks=["stored_balances"]))
    code = main(["ledger", "--target", books.dsn, "--config", str(config)])
    output = capsys.readouterr().out
    assert code == 2
    assert "ERROR    stored_balances" in output
