"""Invalid `dbsync run` requests from the corpus: exit 2, one line naming the field, no SQL runs.

Each request in ``tests/fixtures/bad_inputs/cli`` is passed as ``--request FILE`` (or the file
as ``--ledger FILE``) to the CLI's ``main()`` in this process, which is what the
``dbsync`` console script calls. The target contains a sentinel table that several requests try
to drop through an identifier, a revision or a DSN.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo

from dbsync.cli.main import main
from dbsync.testing.servers import TestServer
from tests.reliability.harness import record_figure, write_gated_revisions

CORPUS = Path(__file__).resolve().parent / "fixtures" / "bad_inputs"
CLI_CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "cases.yaml").read_text("utf-8"))["cli"]
CANARY_PASSWORD = "canary-Bad-Input-51d2"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A valid migration set, an empty directory and one with a non-UTF-8 revision file."""
    base = tmp_path_factory.mktemp("bad-cli")
    bad_utf8 = base / "bad-utf8"
    bad_utf8.mkdir()
    (bad_utf8 / "r01_bad.py").write_bytes(b'"""\xff\xfe"""\nrevision = "r01"\n'
                                          b"down_revision = None\n")
    (base / "empty").mkdir()
    return {"migrations": write_gated_revisions(base / "migrations"), "empty": base / "empty",
            "bad_utf8": bad_utf8, "base": base}


@pytest.fixture(scope="module")
def databases(pg: TestServer) -> Iterator[dict[str, str]]:
    """A source and a target shared by the cases; the target contains the sentinel table."""
    names = {"source": pg.create_database("badsrc"), "target": pg.create_database("badcli")}
    target = pg.dsn(names["target"])
    with psycopg.connect(target, autocommit=True) as connection:
        connection.execute("CREATE TABLE sentinel (id integer)")
        connection.execute("INSERT INTO sentinel VALUES (1)")
        connection.execute("CREATE TABLE postings (transaction_id bigint, amount numeric, "
                           "currency text)")
    yield {role: pg.dsn(name) for role, name in names.items()}
    for name in names.values():
        pg.drop_database(name)


def _sentinel_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute("SELECT count(*) FROM sentinel").fetchone()
    return int(row[0]) if row is not None else 0


def _materialize(case: dict[str, Any], *, workspace: dict[str, Path],
                 values: dict[str, str]) -> Path:
    """Copy the corpus file into the workspace with its placeholders filled in."""
    source = CORPUS / str(case["file"])
    content = source.read_bytes()
    for placeholder, value in values.items():
        # JSON strings need their backslashes and quotes escaped; DSNs here have neither.
        content = content.replace(placeholder.encode(), value.encode())
    destination = workspace["base"] / source.name
    destination.write_bytes(content)
    return destination


@pytest.mark.parametrize("case", CLI_CASES, ids=[Path(case["file"]).stem for case in CLI_CASES])
def test_bad_request_exits_two_naming_field(
        case: dict[str, Any], databases: dict[str, str],
        workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The request is rejected with exit 2 and one line that names the invalid field."""
    source, target = databases["source"], databases["target"]
    target_with_canary = make_conninfo(target, password=CANARY_PASSWORD)
    values = {
        "@SOURCE_DSN@": source,
        "@TARGET_DSN_INJECTED@": make_conninfo(target, dbname="x'; DROP TABLE sentinel; --",
                                               password=CANARY_PASSWORD),
        "@TARGET_DSN@": target,
        "@MIGRATIONS@": str(workspace["migrations"]),
        "@EMPTY_DIR@": str(workspace["empty"]),
        "@BAD_UTF8_DIR@": str(workspace["bad_utf8"]),
    }
    path = _materialize(case, workspace=workspace, values=values)
    if case.get("args"):
        arguments = ["run", "--source", source, "--target", target_with_canary,
                     "--migrations", str(workspace["migrations"]),
                     *[str(path) if argument == "@FILE@" else argument
                       for argument in case["args"]]]
    else:
        arguments = ["run", "--request", str(path)]
    expected = case["field"]
    for placeholder, value in values.items():
        expected = expected.replace(placeholder, value)

    exit_code = main(arguments)
    captured = capsys.readouterr()
    # A request rejected before the sync starts gets one "dbsync: error:" line on standard
    # error. Once the sync has started, its report carries the one "error (Reason):" line
    # and log lines (JSON off a terminal) precede it on standard error.
    lines = [line for line in captured.err.splitlines() if line.startswith("dbsync: error: ")]
    lines += [line for line in captured.out.splitlines() if line.startswith("error (")]
    record_figure("bad-input-cli", {"case": Path(case["file"]).stem, "exit_code": exit_code,
                                    "rejected": exit_code == 2})

    assert exit_code == 2, (captured.out + captured.err)[-2000:]
    assert len(lines) == 1, captured.err[-2000:]
    assert expected in lines[0], lines[0]
    assert CANARY_PASSWORD not in captured.out + captured.err
    assert _sentinel_rows(target) == 1
