"""The sync child processes: request on stdin, timeout kill, concurrency limit, reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psutil

from dbsync.k8s.executor import CHILD_COMMAND, ChildOutcome, SyncExecutor
from dbsync.k8s.status import VerdictKind, judge
from dbsync.pipeline.lock import SyncLock


def _request(source: str, target: str, *, lock_wait_seconds: float = 0.0) -> dict[str, object]:
    return {"source_dsn": source, "target_dsn": target, "lock_wait_seconds": lock_wait_seconds,
            "sync_id": "0b5c7a3e-1111-4222-8333-444455556666"}


def test_credentials_never_reach_the_command_line(
        make_database: Callable[[str], str]) -> None:
    """While a child waits for the sync lock, its argv holds no DSN and no password."""
    source, target = make_database("src"), make_database("tgt")
    executor = SyncExecutor(max_concurrent_syncs=1)

    async def scenario() -> list[str]:
        task = asyncio.create_task(executor.run(_request(source, target, lock_wait_seconds=30),
                                                timeout_seconds=60))
        while not executor.running_pids:
            await asyncio.sleep(0.05)
        command = psutil.Process(executor.running_pids[0]).cmdline()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return command

    with SyncLock(dsn=target, lock_wait_seconds=1, connect_timeout_seconds=5):
        command = asyncio.run(scenario())

    assert command[1:] == list(CHILD_COMMAND)
    assert target not in " ".join(command)


def test_timeout_kills_the_child_and_is_transient(make_database: Callable[[str], str]) -> None:
    source, target = make_database("src"), make_database("tgt")
    executor = SyncExecutor(max_concurrent_syncs=1)

    with SyncLock(dsn=target, lock_wait_seconds=1, connect_timeout_seconds=5):
        outcome = asyncio.run(executor.run(_request(source, target, lock_wait_seconds=60),
                                           timeout_seconds=3))
    verdict = judge(outcome, sync_id="s", fail_on_drift=True, timeout_seconds=3)

    assert outcome.timed_out
    assert executor.running_pids == ()
    assert verdict.kind is VerdictKind.TRANSIENT
    assert verdict.reason == "SyncTimedOut"


def test_concurrency_limit_runs_one_child_at_a_time(
        make_database: Callable[[str], str]) -> None:
    source, target = make_database("src"), make_database("tgt")
    executor = SyncExecutor(max_concurrent_syncs=1)
    peak = 0

    async def scenario() -> None:
        nonlocal peak
        runs = asyncio.gather(*(executor.run(_request(source, target, lock_wait_seconds=60),
                                             timeout_seconds=2) for _ in range(2)))
        watcher = asyncio.ensure_future(runs)
        while not watcher.done():
            peak = max(peak, len(executor.running_pids))
            await asyncio.sleep(0.05)
        await watcher

    with SyncLock(dsn=target, lock_wait_seconds=1, connect_timeout_seconds=5):
        asyncio.run(scenario())

    assert peak == 1


def test_spare_child_is_used_and_stopped(make_database: Callable[[str], str]) -> None:
    """A no-op sync reports Succeeded with our sync id; close() stops the spare child."""
    source, target = make_database("src"), make_database("tgt")
    executor = SyncExecutor(max_concurrent_syncs=1, prestart=True)

    async def scenario() -> tuple[ChildOutcome, bool]:
        first = await executor.run(_request(source, target), timeout_seconds=120)
        spare = executor._spare
        await executor.close()
        return first, spare is not None and spare.returncode is not None

    outcome, spare_stopped = asyncio.run(scenario())

    assert outcome.exit_code == 0, outcome.stderr_tail
    assert outcome.report is not None
    assert outcome.report["sync_id"] == "0b5c7a3e-1111-4222-8333-444455556666"
    assert outcome.report["result"] == "Succeeded"
    assert spare_stopped
