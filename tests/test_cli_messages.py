"""Messages and options of the command line that a new user meets first.

Empty or mis-shaped ledger YAML files, request files that are not valid JSON, the
``--request`` option and its old name ``--config``, and ``--log-level`` with
``DBSYNC_LOG_LEVEL``. Only the log level tests run a sync, against the session's PostgreSQL
server. The others fail before any connection.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from dbsync.cli.main import build_parser, main
from dbsync.cli.run_command import request_from_config
from dbsync.pipeline.request import DSN_ENVIRONMENT_FIELDS, SyncRequest
from tests.conftest import DatabasePair

REPOSITORY = Path(__file__).resolve().parents[1]

# A DSN that is never connected to: every case here fails while reading its file.
UNUSED_DSN = "postgresql://nobody@127.0.0.1:1/none"

LEDGER_HINT = "it must be a YAML mapping with at least a postings section"
REQUEST_HINT = ("See examples/request.json in the dbsync repository for a complete request "
                "and docs/request.md for every field")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Clear DBSYNC_ variables and restore the logging setup that ``dbsync run`` replaces."""
    for variable in ("DBSYNC_LOG_LEVEL", "DBSYNC_SOURCE_DSN", "DBSYNC_TARGET_DSN",
                     "DBSYNC_TERMINATION_MESSAGE_PATH"):
        monkeypatch.delenv(variable, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dbsync: error: ")]


def _log_levels(stderr: str) -> list[str]:
    """Return the level of each JSON log line on standard error."""
    levels = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            levels.append(json.loads(line)["level"])
    return levels


# Ledger YAML files


@pytest.mark.parametrize("content", ["", "\n  \n", "# ledger for staging\n# todo\n"],
                         ids=["zero-bytes", "blank-lines", "comments-only"])
def test_ledger_command_empty_file(content: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """dbsync ledger names an empty ledger file as empty and points at the example."""
    path = tmp_path / "ledger.yaml"
    path.write_text(content, encoding="utf-8")

    code = main(["ledger", "--target", UNUSED_DSN, "--config", str(path)])
    stderr = capsys.readouterr().err
    lines = _error_lines(stderr)

    assert code == 2
    assert len(lines) == 1, stderr
    assert f"ledger configuration {path} is empty" in lines[0]
    assert LEDGER_HINT in lines[0]
    assert "examples/ledger.yaml" in lines[0]
    assert "NoneType" not in stderr
    assert "Traceback" not in stderr


def test_ledger_comments_only_named(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A ledger file with only comments is called empty, and the comments are mentioned."""
    path = tmp_path / "ledger.yaml"
    path.write_text("# postings: public.postings\n", encoding="utf-8")

    main(["ledger", "--target", UNUSED_DSN, "--config", str(path)])
    lines = _error_lines(capsys.readouterr().err)

    assert f"{path} is empty (it contains only comments)" in lines[0]


def test_run_ledger_option_empty_file(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """dbsync run --ledger reports an empty ledger file the same way, with exit code 2."""
    path = tmp_path / "ledger.yaml"
    path.write_bytes(b"")

    code = main(["run", "--source", UNUSED_DSN, "--target", UNUSED_DSN, "--ledger", str(path)])
    stderr = capsys.readouterr().err
    lines = _error_lines(stderr)

    assert code == 2
    assert len(lines) == 1, stderr
    assert f"ledger configuration {path} is empty" in lines[0]
    assert "examples/ledger.yaml" in lines[0]
    assert "NoneType" not in stderr


@pytest.mark.parametrize(("content", "kind", "python_name"), [
    ("- postings\n- accounts\n", "a list", "list"),
    ("postings\n", "a string", "str"),
    ("42\n", "an integer", "int"),
    ("4.5\n", "a number", "float"),
    ("true\n", "a boolean", "bool"),
    ("2024-03-31\n", "a date", "date"),
    ("null\n", "null", "NoneType"),
], ids=["list", "string", "integer", "float", "boolean", "date", "null"])
def test_ledger_top_level_kind_named(content: str, kind: str, python_name: str,
                                     tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A ledger file whose top level is not a mapping names the kind in plain words."""
    path = tmp_path / "ledger.yaml"
    path.write_text(content, encoding="utf-8")

    code = main(["ledger", "--target", UNUSED_DSN, "--config", str(path)])
    lines = _error_lines(capsys.readouterr().err)

    assert code == 2
    assert f"{path} contains {kind} at the top level" in lines[0]
    assert LEDGER_HINT in lines[0]
    # Only the text after the path is checked, because pytest builds the path from names.
    after_path = lines[0].split(str(path), 1)[1]
    assert not re.search(rf"\b{python_name}\b", after_path.replace(kind, "")), lines[0]


# Request JSON files


def test_request_file_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Invalid JSON in --request FILE names the file, line, column and the request docs."""
    path = tmp_path / "request.json"
    # Line 3 lacks the colon after "target_dsn", so the parser stops at column 16.
    path.write_text('{\n  "source_dsn": "postgresql://a/b",\n  "target_dsn" "x"\n}\n',
                    encoding="utf-8")

    code = main(["run", "--request", str(path)])
    stderr = capsys.readouterr().err
    lines = _error_lines(stderr)

    assert code == 2
    assert len(lines) == 1, stderr
    assert f"the request file {path} is not valid JSON at line 3, column 16" in lines[0]
    assert "(Expecting ':' delimiter)" in lines[0]
    assert "fix the JSON syntax at that position" in lines[0]
    assert REQUEST_HINT in lines[0]


def test_request_stdin_syntax_error(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Invalid JSON on standard input (--request -) names standard input and the position."""
    monkeypatch.setattr("sys.stdin", io.StringIO('{"source_dsn": }'))

    code = main(["run", "--request", "-"])
    lines = _error_lines(capsys.readouterr().err)

    assert code == 2
    assert "the request on standard input is not valid JSON at line 1, column 16" in lines[0]
    assert REQUEST_HINT in lines[0]


def test_config_env_syntax_error(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Invalid JSON in --config-env VARIABLE names the variable, the position and the docs."""
    monkeypatch.setenv("DBSYNC_REQUEST", "{'source_dsn': 'x'}")

    code = main(["run", "--config-env", "DBSYNC_REQUEST"])
    lines = _error_lines(capsys.readouterr().err)

    assert code == 2
    assert ("the request in $DBSYNC_REQUEST (--config-env) is not valid JSON at line 1, "
            "column 2") in lines[0]
    assert "Expecting property name enclosed in double quotes" in lines[0]
    assert REQUEST_HINT in lines[0]


def test_request_file_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty request file is called empty instead of invalid JSON at line 1."""
    path = tmp_path / "request.json"
    path.write_text("\n", encoding="utf-8")

    code = main(["run", "--request", str(path)])
    lines = _error_lines(capsys.readouterr().err)

    assert code == 2
    assert f"the request file {path} is empty: write the request as one JSON object" in lines[0]
    assert REQUEST_HINT in lines[0]


@pytest.mark.parametrize(("content", "kind"), [
    ('["source_dsn", "target_dsn"]', "an array"),
    ('"postgresql://a/b"', "a string"),
    ("7", "a number"),
    ("null", "null"),
], ids=["array", "string", "number", "null"])
def test_request_file_not_object(content: str, kind: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A request file containing another JSON value names that value's kind and the file."""
    path = tmp_path / "request.json"
    path.write_text(content, encoding="utf-8")

    code = main(["run", "--request", str(path)])
    lines = _error_lines(capsys.readouterr().err)

    assert code == 2
    assert f"the request file {path} contains {kind}, not a JSON object" in lines[0]
    assert REQUEST_HINT in lines[0]


def test_example_request_is_valid() -> None:
    """examples/request.json, which the error messages point at, is a valid request."""
    fields = request_from_config(str(REPOSITORY / "examples" / "request.json"))

    request = SyncRequest.model_validate(fields)

    assert request.ledger is not None


def test_request_docs_list_every_field() -> None:
    """docs/request.md, which the error messages point at, names every request field."""
    text = (REPOSITORY / "docs" / "request.md").read_text(encoding="utf-8")

    for name in [*SyncRequest.model_fields, *DSN_ENVIRONMENT_FIELDS]:
        assert f"`{name}`" in text, name


# --request and its old name --config


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("option", ["--request", "--config"])
def test_request_option_and_old_name(command: str, option: str) -> None:
    """--request FILE and the old --config FILE both set the request file."""
    args = build_parser().parse_args([command, option, "request.json"])

    assert args.config == "request.json"


def test_run_help_shows_request_only(capsys: pytest.CaptureFixture[str]) -> None:
    """dbsync run --help lists --request, names --config as its old name, hides --config."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = capsys.readouterr().out
    # argparse indents each option by two spaces and the wrapped help text further.
    option_lines = [line for line in help_text.splitlines() if line.startswith("  -")]

    assert any(line.startswith("  --request FILE") for line in option_lines)
    assert not any(line.startswith("  --config FILE") for line in option_lines)
    assert "[--config FILE]" not in help_text
    assert "--config FILE is the deprecated old name" in " ".join(help_text.split())


def test_old_config_option_logs_warning(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """dbsync run --config still reads the request and logs that the name is deprecated."""
    path = tmp_path / "request.json"
    path.write_text("[]", encoding="utf-8")

    code = main(["run", "--config", str(path)])
    stderr = capsys.readouterr().err

    assert code == 2
    assert f"the request file {path} contains an array" in _error_lines(stderr)[0]
    assert "--config is the deprecated old name of --request" in stderr


def test_request_option_logs_no_warning(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """dbsync run --request logs no deprecation warning."""
    path = tmp_path / "request.json"
    path.write_text("[]", encoding="utf-8")

    main(["run", "--request", str(path)])

    assert "deprecated" not in capsys.readouterr().err


# --log-level and DBSYNC_LOG_LEVEL


@pytest.mark.parametrize("command", ["run", "plan"])
def test_log_level_option_rejects_unknown_name(command: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--log-level accepts only debug, info, warning and error."""
    with pytest.raises(SystemExit) as raised:
        main([command, "--log-level", "loud"])

    assert raised.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "plan"])
def test_log_level_variable_rejects_unknown_name(command: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown DBSYNC_LOG_LEVEL is a usage error naming the variable and the levels."""
    monkeypatch.setenv("DBSYNC_LOG_LEVEL", "loud")

    code = main([command, "--source", UNUSED_DSN, "--target", UNUSED_DSN])
    lines = _error_lines(capsys.readouterr().err)

    assert code == 2
    assert ("$DBSYNC_LOG_LEVEL is 'loud', which is not a log level: use one of debug, info, "
            "warning, error") in lines[0]


def test_run_logs_info_by_default(db_pair: DatabasePair,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without --log-level or DBSYNC_LOG_LEVEL, dbsync run writes its info step logs."""
    code = main(["run", "--source", db_pair.source, "--target", db_pair.target])
    levels = _log_levels(capsys.readouterr().err)

    assert code == 0
    assert "info" in levels


def test_run_log_level_warning_drops_info(db_pair: DatabasePair,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """dbsync run --log-level warning writes no info log lines."""
    code = main(["run", "--source", db_pair.source, "--target", db_pair.target,
                 "--log-level", "warning"])
    levels = _log_levels(capsys.readouterr().err)

    assert code == 0
    assert "info" not in levels


def test_log_level_variable_and_option(db_pair: DatabasePair, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """DBSYNC_LOG_LEVEL=error drops info lines, and --log-level INFO overrides it."""
    monkeypatch.setenv("DBSYNC_LOG_LEVEL", "error")

    quiet_code = main(["run", "--source", db_pair.source, "--target", db_pair.target])
    quiet_levels = _log_levels(capsys.readouterr().err)
    loud_code = main(["run", "--source", db_pair.source, "--target", db_pair.target,
                      "--log-level", "INFO"])
    loud_levels = _log_levels(capsys.readouterr().err)

    assert quiet_code == 0
    assert quiet_levels == []
    assert loud_code == 0
    assert "info" in loud_levels


def test_closed_output_pipe_exits_quietly() -> None:
    """A reader that closes the pipe early (dbsync ... | head) gets no traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dbsync.cli.main", "crd", "--output", "-"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=60)

    assert b"Traceback" not in stderr, stderr.decode()
    assert process.returncode == 141


@pytest.mark.parametrize(("field", "value"), [
    ("allow_downgrade", "yes"),
    ("run_migrations", "false"),
    ("lock_wait_seconds", "60"),
    ("statement_timeout_ms", "1000"),
])
def test_request_values_are_not_coerced(field: str, value: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A switch or number written as a string is rejected, never read as a guess."""
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"source_dsn": UNUSED_DSN, "target_dsn": UNUSED_DSN,
                                field: value}), encoding="utf-8")

    code = main(["run", "--request", str(path)])
    lines = _error_lines(capsys.readouterr().err)

    assert code == 2
    assert f"{field}: Input should be a valid" in lines[0]


def test_ledger_honours_log_level_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """dbsync ledger reads DBSYNC_LOG_LEVEL like run and plan, so a bad value is an error."""
    monkeypatch.setenv("DBSYNC_LOG_LEVEL", "loud")
    path = tmp_path / "ledger.yaml"
    path.write_text("postings: {}\n", encoding="utf-8")

    code = main(["ledger", "--target", UNUSED_DSN, "--config", str(path)])
    lines = _error_lines(capsys.readouterr().err)

    assert code == 2
    assert "$DBSYNC_LOG_LEVEL is 'loud', which is not a log level" in lines[0]
