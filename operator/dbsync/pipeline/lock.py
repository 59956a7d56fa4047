"""The sync lock: a PostgreSQL session advisory lock on the target, held for a whole sync.

The key is ``hashtextextended('dbsync:' || current_database(), 0)``, a bigint, so every
dbsync process that targets the same database contends for the same lock whatever DSN it
used. A session lock dies with its connection, so a killed process never leaves a stale
lock behind (unlike a lock row in a table). The lock lives on a dedicated, direct
connection: behind a transaction-mode pooler a session lock would protect nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

import psycopg

from dbsync.pipeline import dsn as dsn_module
from dbsync.pipeline.errors import LockTimeoutError

logger = logging.getLogger("dbsync.lock")

LOCK_KEY_SQL = "hashtextextended('dbsync:' || current_database(), 0)"

# Poll interval bounds while another session holds the lock.
_FIRST_POLL_SECONDS = 0.05
_MAX_POLL_SECONDS = 0.5
# How often a waiting process repeats the "held by" log line.
_HOLDER_LOG_INTERVAL_SECONDS = 10.0

_HOLDER_SQL = """
SELECT a.pid, a.application_name, a.backend_start, a.state, a.client_addr::text
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %(classid)s
  AND l.objid::bigint = %(objid)s
  AND l.objsubid = 1
"""


@dataclass(frozen=True)
class LockHolder:
    """The session that holds the sync lock, as pg_locks and pg_stat_activity show it."""

    pid: int
    application_name: str
    backend_start: datetime | None
    state: str | None
    client_addr: str | None

    def __str__(self) -> str:
        since = self.backend_start.isoformat() if self.backend_start else "unknown"
        return (f"pid {self.pid} (application_name {self.application_name!r}, "
                f"connected since {since}, state {self.state or 'unknown'})")


class SyncLockLostError(LockTimeoutError):
    """The sync lock's session ended, so another sync may now run against the target."""

    reason = "SyncLockLost"


def split_key(key: int) -> tuple[int, int]:
    """Return the (classid, objid) pair under which pg_locks shows a bigint advisory key."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


class SyncLock:
    """Context manager that holds the target's session advisory lock until it exits."""

    def __init__(self, *, dsn: str, lock_wait_seconds: float = 60.0,
                 connect_timeout_seconds: int = 10) -> None:
        if lock_wait_seconds < 0:
            raise ValueError(f"lock_wait_seconds must be 0 or more, not {lock_wait_seconds}")
        self._dsn = dsn
        self._lock_wait_seconds = lock_wait_seconds
        self._connect_timeout_seconds = connect_timeout_seconds
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None
        self.key: int | None = None
        self.acquired_at: datetime | None = None
        self.waited_seconds: float = 0.0
        # Server process id of the lock's session (pg_stat_activity.pid), kept after exit.
        self.backend_pid: int | None = None

    @property
    def held(self) -> bool:
        return self._connection is not None and not self._connection.closed

    def __enter__(self) -> Self:
        address = dsn_module.describe(self._dsn, role="target")
        connection = dsn_module.connect(
            self._dsn, role="target", autocommit=True,
            connect_timeout_seconds=self._connect_timeout_seconds,
            application_name="dbsync lock")
        self.backend_pid = connection.info.backend_pid
        try:
            self._acquire(connection, address)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return self

    def _acquire(self, connection: psycopg.Connection[tuple[object, ...]],
                 address: dsn_module.DatabaseAddress) -> None:
        row = connection.execute(f"SELECT {LOCK_KEY_SQL}").fetchone()
        assert row is not None
        key = int(str(row[0]))
        self.key = key
        started = time.monotonic()
        deadline = started + self._lock_wait_seconds
        poll_seconds = _FIRST_POLL_SECONDS
        last_report = float("-inf")
        holder: LockHolder | None = None

        while True:
            granted = connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if granted is not None and granted[0] is True:
                break
            now = time.monotonic()
            holder = self._find_holder(connection, key)
            if now >= deadline:
                holder_text = str(holder) if holder is not None else "a session that has ended"
                raise LockTimeoutError(
                    f"the sync lock on {address} was not granted within "
                    f"{self._lock_wait_seconds:g} s: held by {holder_text}; wait for that sync to "
                    "finish, raise the lock wait, or end that session with "
                    "pg_terminate_backend(pid) if it is stuck")
            if now - last_report >= _HOLDER_LOG_INTERVAL_SECONDS:
                logger.info("waiting for the sync lock on %s (key %d), held by %s",
                            address, key, holder if holder is not None else "an ending session")
                last_report = now
            time.sleep(min(poll_seconds, max(deadline - now, 0.0)))
            poll_seconds = min(poll_seconds * 2, _MAX_POLL_SECONDS)

        self.waited_seconds = time.monotonic() - started
        self.acquired_at = datetime.now(UTC)
        # Why: waiters print the holder's application_name, so it carries the time the lock
        # was taken (pg_locks has no grant time for granted locks).
        since = self.acquired_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        connection.execute("SELECT set_config('application_name', %s, false)",
                           (f"dbsync lock holder since {since}",))
        logger.info("took the sync lock on %s (key %d) after %.2f s", address, key,
                    self.waited_seconds)

    def ensure_held(self) -> None:
        """Raise SyncLockLostError unless this lock's session is alive and holds the lock.

        A session killed by an administrator or a network failure drops the lock silently,
        so call this before a step that must not overlap another sync.
        """
        connection = self._connection
        if connection is None or connection.closed or self.key is None:
            raise SyncLockLostError(
                "the sync lock is not held: its session was closed; start the sync again")
        classid, objid = split_key(self.key)
        try:
            row = connection.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND classid::bigint = %s AND objid::bigint = %s "
                "AND objsubid = 1", (classid, objid)).fetchone()
        except psycopg.Error as error:
            lines = str(error).strip().splitlines()
            detail = dsn_module.redact_text(lines[0] if lines else type(error).__name__)
            raise SyncLockLostError(
                f"the sync lock's session (pid {self.backend_pid}) ended: {detail}; "
                "another sync may be running, so start this one again") from None
        if row is None or not row[0]:
            raise SyncLockLostError(
                f"the sync lock's session (pid {self.backend_pid}) no longer holds the lock; "
                "start the sync again")

    @staticmethod
    def _find_holder(connection: psycopg.Connection[tuple[object, ...]],
                     key: int) -> LockHolder | None:
        classid, objid = split_key(key)
        row = connection.execute(_HOLDER_SQL, {"classid": classid, "objid": objid}).fetchone()
        if row is None:
            return None
        pid, application_name, backend_start, state, client_addr = row
        return LockHolder(
            pid=int(str(pid)), application_name=str(application_name or ""),
            backend_start=backend_start if isinstance(backend_start, datetime) else None,
            state=str(state) if state is not None else None,
            client_addr=str(client_addr) if client_addr is not None else None)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            if not connection.closed and self.key is not None:
                connection.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        except psycopg.Error as error:
            # Closing the session below releases the lock anyway.
            logger.warning("could not release the sync lock explicitly: %s",
                           dsn_module.redact_text(str(error)))
        finally:
            connection.close()
        logger.info("released the sync lock (key %s)", self.key)
