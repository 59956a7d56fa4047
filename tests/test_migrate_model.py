"""Migrate options, results and URLs: validation, JSON form and rendering (no database)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.migrate import (
    DEFAULT_LOCK_TIMEOUT_MS,
    DEFAULT_STATEMENT_TIMEOUT_MS,
    DryRunMode,
    MigrateOptions,
    MigrateResult,
    OutcomeStatus,
    RevisionOutcome,
    TransactionMode,
)
from dbsync.pipeline.migrate_alembic import public_url


def make_result() -> MigrateResult:
    operation_id = uuid.uuid4()
    return MigrateResult(
        revision_before="r001", revision_after="r002", target_revision="r003",
        outcomes=(
            RevisionOutcome(revision="r002", file_name="r002.py", description="Add t_2",
                            status=OutcomeStatus.APPLIED, duration_ms=12, transactional=True,
                            operation_id=operation_id),
            RevisionOutcome(revision="r003", file_name="r003.py", description="Index",
                            status=OutcomeStatus.FAILED, duration_ms=0, transactional=False,
                            warnings=("not transactional: INDEX ... CONCURRENTLY",)),
        ),
        dry_run=DryRunMode.OFF, invalid_indexes=("public.ix_t1_name",),
        transaction_mode=TransactionMode.PER_REVISION)


def test_options_accept_strings() -> None:
    options = MigrateOptions(migrations_dir=Path("m"), transaction_mode="per-revision",
                             dry_run="rehearse")
    assert options.transaction_mode is TransactionMode.PER_REVISION
    assert options.dry_run is DryRunMode.REHEARSE


def test_options_default_timeouts() -> None:
    options = MigrateOptions(migrations_dir=Path("m"))
    assert options.lock_timeout_ms == DEFAULT_LOCK_TIMEOUT_MS
    assert options.statement_timeout_ms == DEFAULT_STATEMENT_TIMEOUT_MS


@pytest.mark.parametrize(("field", "value", "message"), [
    ("transaction_mode", "sometimes", "invalid transaction mode 'sometimes'"),
    ("dry_run", "maybe", "invalid dry-run mode 'maybe'"),
    ("lock_timeout_ms", 0, "lock_timeout_ms must be a positive"),
    ("statement_timeout_ms", -5, "statement_timeout_ms must be a positive"),
    ("lock_retries", -1, "lock_retries must be 0 or more"),
    ("revision", " ", "target revision is empty"),
])
def test_options_invalid_value_rejected(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        MigrateOptions(migrations_dir=Path("m"), **{field: value})  # type: ignore[arg-type]


def test_result_applied_lists_committed_only() -> None:
    assert make_result().applied == ("r002",)


def test_result_to_dict_is_json_safe() -> None:
    encoded = json.loads(json.dumps(make_result().to_dict()))
    assert encoded["outcomes"][1]["status"] == "failed"
    assert encoded["transaction_mode"] == "per-revision"
    assert encoded["invalid_indexes"] == ["public.ix_t1_name"]


def test_result_text_names_each_revision() -> None:
    text = make_result().render_text()
    assert "applied     r002  r002.py  12 ms" in text
    assert "[not transactional]" in text
    assert "INVALID indexes: public.ix_t1_name" in text


def test_public_url_has_no_password() -> None:
    url = public_url("postgresql://app:s3cret@db.internal:6432/ledger")
    assert "s3cret" not in url.render_as_string(hide_password=False)
    assert url.host == "db.internal"


def test_public_url_socket_host_in_query() -> None:
    url = public_url("host=/var/run/postgresql dbname=ledger user=app")
    assert url.host is None
    assert url.query["host"] == "/var/run/postgresql"
