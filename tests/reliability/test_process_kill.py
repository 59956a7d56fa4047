"""SIGKILL of `dbsync run` at ten moments of a five-revision migration, then the next run.

Each case parks the sync at a known point (a revision blocked on a gate the test holds, the
sync lock held by the test, or an audit insert blocked on the audit chain's lock), checks
with ``pg_stat_activity`` that the child is there, and kills it with SIGKILL. Then:

- the target is unchanged or exactly at a revision boundary: ``alembic_version`` and the
  marker tables agree, and the checksum rows the killed sync wrote name the same revisions;
- no advisory lock is left on the target once the server has ended the dead sessions;
- the next run starts from that boundary (its report's ``revision_before``), succeeds, and
  closes the killed sync's open operations as ABANDONED, naming itself as the closer.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dbsync.pipeline.lock import SyncLock
from dbsync.testing.servers import TestServer
from tests.reliability.harness import (
    GATED_LOCK_TIMEOUT_MS,
    REVISION_COUNT,
    advisory_locks,
    applied_revision,
    audit_operations,
    checksum_revisions,
    held_audit_chain,
    held_gates,
    marker_tables,
    record_figure,
    revision_id,
    run_to_end,
    session_waiting_on,
    start_run,
    sync_sessions,
    wait_until,
    write_gated_revisions,
)

HEAD = revision_id(REVISION_COUNT)
# Revision 3 of the per-revision set runs in an autocommit block (not in a transaction).
NON_TRANSACTIONAL_REVISION = 3


@dataclass(frozen=True)
class KillMoment:
    """Where the sync is parked when it is killed, and the boundary it must leave behind."""

    name: str
    transaction_mode: str
    # Revision whose gate is held; 0 parks nothing in the migration.
    gate: int = 0
    # Park the child in its wait for the sync lock instead.
    hold_sync_lock: bool = False
    # Release the gate while holding the audit chain lock, parking the next audit insert.
    block_audit_after_gate: bool = False
    # Revisions committed when the child dies; None when either 0 or all are acceptable.
    committed: int | None = 0
    slow: bool = False


MOMENTS = [
    KillMoment("lock-wait", "all", hold_sync_lock=True, slow=True),
    KillMoment("all-in-first-revision", "all", gate=1, slow=True),
    KillMoment("all-in-last-revision", "all", gate=5, slow=True),
    KillMoment("all-audit-insert-mid-transaction", "all", gate=3, block_audit_after_gate=True,
               slow=True),
    KillMoment("all-audit-insert-at-commit", "all", gate=5, block_audit_after_gate=True,
               committed=None, slow=True),
    KillMoment("per-revision-in-first-revision", "per-revision", gate=1, slow=True),
    KillMoment("per-revision-in-second-revision", "per-revision", gate=2, committed=1,
               slow=True),
    KillMoment("per-revision-non-transactional-step", "per-revision", gate=3, committed=2,
               slow=True),
    KillMoment("per-revision-in-last-revision", "per-revision", gate=5, committed=4, slow=True),
    KillMoment("per-revision-audit-insert-after-commit", "per-revision", gate=2,
               block_audit_after_gate=True, committed=2),
]


@pytest.fixture(scope="module")
def revision_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The gated revisions for each transaction mode (per-revision has a non-transactional one)."""
    base = tmp_path_factory.mktemp("gated")
    return {
        "all": write_gated_revisions(base / "all"),
        "per-revision": write_gated_revisions(
            base / "per-revision", non_transactional=(NON_TRANSACTIONAL_REVISION,)),
    }


@pytest.fixture(scope="module")
def source_at_head(pg: TestServer, revision_sets: dict[str, Path]) -> Iterator[str]:
    """A source database at the gated head (the gates are open while it migrates)."""
    name = pg.create_database("relsrc")
    dsn = pg.dsn(name)
    outcome = run_to_end({"source_dsn": dsn, "target_dsn": dsn,
                          "migrations_dir": str(revision_sets["all"])})
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    yield dsn
    pg.drop_database(name)


def _request(*, source: str, target: str, migrations: Path, mode: str) -> dict[str, Any]:
    return {"source_dsn": source, "target_dsn": target, "migrations_dir": str(migrations),
            "transaction_mode": mode, "lock_timeout_ms": GATED_LOCK_TIMEOUT_MS,
            "lock_wait_seconds": 120, "connect_timeout_seconds": 5}


def _park(moment: KillMoment, target: str, stack: ExitStack) -> Callable[[], object]:
    """Set up the trap for ``moment`` and return the check that the child reached it."""
    if moment.hold_sync_lock:
        stack.enter_context(SyncLock(dsn=target, lock_wait_seconds=1))
        # The waiter polls pg_try_advisory_lock on a session named "dbsync lock"; the holder's
        # session is renamed "dbsync lock holder since ..." once it has the lock.
        return lambda: next((session for session in sync_sessions(target)
                             if session["application_name"] == "dbsync lock"), None)

    release = stack.enter_context(held_gates(target, [moment.gate]))
    gate_text = f"reliability gate {moment.gate} "
    if not moment.block_audit_after_gate:
        return lambda: session_waiting_on(target, gate_text)

    def audit_insert_parked() -> object:
        # Open the gate only once the child is behind it, with the chain lock already held.
        if session_waiting_on(target, gate_text) is not None:
            stack.enter_context(held_audit_chain(target))
            release(moment.gate)
            return None
        return session_waiting_on(target, "sync_audit_logs")

    return audit_insert_parked


def _exercise(moment: KillMoment, *, source: str, target: str, migrations: Path,
              workdir: Path, sync_id: str) -> dict[str, Any]:
    request = {**_request(source=source, target=target, migrations=migrations,
                          mode=moment.transaction_mode), "sync_id": sync_id}
    output = workdir / f"{moment.name}.out"
    with ExitStack() as stack:
        reached = _park(moment, target, stack)
        child = start_run(request, output_path=output)
        try:
            wait_until(reached, timeout_seconds=60, description=f"the child at {moment.name}")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        killed_at = time.monotonic()
    # The server notices the closed sockets and ends the child's sessions on its own.
    wait_until(lambda: not sync_sessions(target), timeout_seconds=30,
               description="the killed child's sessions to end")
    return {"exit_signal": -child.returncode, "output": output,
            "sessions_gone_seconds": time.monotonic() - killed_at}


def _expected_markers(moment: KillMoment, committed: int) -> list[str]:
    """Return the marker tables of the committed revisions, plus the partial effect of a
    non-transactional revision killed inside its autocommit block (its CREATE TABLE ran)."""
    numbers = list(range(1, committed + 1))
    if moment.transaction_mode == "per-revision" and moment.gate == NON_TRANSACTIONAL_REVISION:
        numbers.append(NON_TRANSACTIONAL_REVISION)
    return [f"marker_{number:02d}" for number in numbers]


@pytest.mark.parametrize("moment", [
    pytest.param(moment, id=moment.name,
                 marks=[pytest.mark.slow] if moment.slow else [])
    for moment in MOMENTS])
def test_killed_sync_leaves_a_boundary_and_recovers(
        moment: KillMoment, pg: TestServer, make_database: Callable[[str], str],
        revision_sets: dict[str, Path], source_at_head: str, tmp_path: Path) -> None:
    """SIGKILL at the moment: boundary state, no lock, ABANDONED trail, next run succeeds."""
    target = make_database("relkill")
    migrations = revision_sets[moment.transaction_mode]

    killed_sync_id = str(uuid.uuid4())
    killed = _exercise(moment, source=source_at_head, target=target, migrations=migrations,
                       workdir=tmp_path, sync_id=killed_sync_id)
    locks_after_kill = advisory_locks(target)
    revision_after_kill = applied_revision(target)
    markers_after_kill = marker_tables(target)
    checksummed = checksum_revisions(target, killed_sync_id)

    following = run_to_end(_request(source=source_at_head, target=target,
                                    migrations=migrations, mode=moment.transaction_mode))
    operations = audit_operations(target, killed_sync_id)
    statuses = {(operation["operation_type"], operation["operation_name"]): operation["status"]
                for operation in operations}
    root = next(operation for operation in operations if operation["operation_type"] == "SYNC")
    committed = 0 if revision_after_kill is None else int(revision_after_kill[1:])
    record_figure("process-kill", {"moment": moment.name, "committed_revisions": committed,
                                   "recovered": following.exit_code == 0,
                                   "sessions_gone_seconds":
                                       round(killed["sessions_gone_seconds"], 2)})

    assert killed["exit_signal"] == signal.SIGKILL
    assert locks_after_kill == []
    if moment.committed is not None:
        assert committed == moment.committed
    else:
        assert committed in (0, REVISION_COUNT)
    assert markers_after_kill == _expected_markers(moment, committed)
    assert checksummed == [revision_id(number) for number in range(1, committed + 1)]
    assert following.exit_code == 0, following.stdout + following.stderr
    assert following.report["migration"]["revision_before"] == revision_after_kill
    assert following.report["migration"]["revision_after"] == HEAD
    assert "IN_PROGRESS" not in statuses.values()
    assert root["status"] == "ABANDONED"
    assert root["metadata"]["closed_by_sync_id"] == following.report["sync_id"]
    for number in range(1, committed + 1):
        assert statuses.get(("REVISION", revision_id(number))) in ("SUCCESS", "ABANDONED")
    assert advisory_locks(target) == []
