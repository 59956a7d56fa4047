"""The sync lock: one migrator per target database, bounded waits, no stale locks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from dbsync.pipeline.errors import LockTimeoutError
from dbsync.pipeline.lock import SyncLock, SyncLockLostError, split_key
from tests.migration_fixtures import (
    alembic_version,
    run_migrate,
    write_revision,
    write_table_chain,
)


def test_second_lock_times_out_naming_holder(target: str) -> None:
    with (SyncLock(dsn=target) as holder, pytest.raises(LockTimeoutError) as caught,
          SyncLock(dsn=target, lock_wait_seconds=0.3)):
        pass
    message = str(caught.value)
    assert f"pid {holder.backend_pid}" in message
    assert "dbsync lock holder since" in message


def test_waiting_logs_holder(target: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dbsync.lock")
    with (SyncLock(dsn=target) as holder, pytest.raises(LockTimeoutError),
          SyncLock(dsn=target, lock_wait_seconds=0.2)):
        pass
    assert any(f"held by pid {holder.backend_pid}" in record.getMessage()
               for record in caplog.records)


def test_lock_released_on_exit(target: str) -> None:
    with SyncLock(dsn=target):
        pass
    with SyncLock(dsn=target, lock_wait_seconds=0) as second:
        assert second.held


def test_killed_holder_leaves_no_stale_lock(target: str) -> None:
    first = SyncLock(dsn=target).__enter__()
    with psycopg.connect(target, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first.backend_pid,))
    with SyncLock(dsn=target, lock_wait_seconds=5) as second:
        assert second.held


def test_lock_key_visible_in_pg_locks(target: str) -> None:
    with SyncLock(dsn=target) as lock, psycopg.connect(target, autocommit=True) as admin:
        assert lock.key is not None
        classid, objid = split_key(lock.key)
        row = admin.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s "
            "AND objid::bigint = %s AND objsubid = 1", (classid, objid)).fetchone()
    assert row == (lock.backend_pid,)


def test_lock_is_per_database(make_database: Callable[[str], str]) -> None:
    first, second = make_database("lock"), make_database("lock")
    with SyncLock(dsn=first), SyncLock(dsn=second, lock_wait_seconds=0) as other:
        assert other.held


def test_two_syncs_apply_revisions_once(target: str, tmp_path: Path) -> None:
    """Two syncs started together: one applies everything, the other waits, finds nothing.

    Threads behave like processes here: each sync has its own lock session, and a session
    advisory lock does not care which process opened it.
    """
    ids = write_table_chain(tmp_path, 3)
    write_revision(tmp_path, "r004", "r003", ["SELECT pg_sleep(0.5)"])
    start = threading.Barrier(2)
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def sync() -> None:
        start.wait()
        try:
            result, _sync_id = run_migrate(target, migrations_dir=tmp_path)
            applied.append(list(result.applied))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=sync) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert sorted(applied, key=len) == [[], [*ids, "r004"]]
    assert alembic_version(target) == ["r004"]


def test_ensure_held_passes_while_held(target: str) -> None:
    with SyncLock(dsn=target) as lock:
        lock.ensure_held()
        assert lock.held


def test_ensure_held_detects_killed_session(target: str) -> None:
    with SyncLock(dsn=target) as lock:
        with psycopg.connect(target, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (lock.backend_pid,))
        with pytest.raises(SyncLockLostError, match=f"pid {lock.backend_pid}"):
            lock.ensure_held()
