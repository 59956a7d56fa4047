"""Run each sync in a child process: ``python -m dbsync.cli.main run --request - --output json``.

A child process per sync keeps Alembic's module-global state, blocking database drivers and
a crash in one sync away from the operator's event loop.  The request, credentials
included, goes to the child on standard input and never on its command line (which any
user on the node can read in ``/proc``).  A semaphore caps the syncs running at once, and a
child that outlives its timeout is killed together with its process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbsync.pipeline.dsn import redact_text

logger = logging.getLogger("dbsync.k8s.executor")

CHILD_COMMAND = ("-m", "dbsync.cli.main", "run", "--request", "-", "--output", "json")

# The same request computes a plan instead (approval.mode Manual); no spare child runs it.
PLAN_COMMAND = ("-m", "dbsync.cli.main", "plan", "--request", "-", "--output", "json")

# Only the end of a child's log is kept: enough for the error that stopped it.
STDERR_TAIL_CHARACTERS = 4000

# Grace period between SIGTERM and SIGKILL when a child is stopped.
TERMINATE_GRACE_SECONDS = 5.0


@dataclass(frozen=True, kw_only=True)
class ChildOutcome:
    """Exit status of one child process and the report it printed, if any."""

    exit_code: int | None
    report: dict[str, Any] | None
    stderr_tail: str
    timed_out: bool
    duration_seconds: float

    @property
    def killed_by_signal(self) -> int | None:
        """The signal number that ended the child, or None when it exited by itself."""
        if self.exit_code is not None and self.exit_code < 0:
            return -self.exit_code
        return None


@dataclass
class SyncExecutor:
    """Starts sync child processes, at most ``max_concurrent_syncs`` at a time."""

    max_concurrent_syncs: int = 2
    python_executable: str = sys.executable
    extra_environment: Mapping[str, str] = field(default_factory=dict)
    prestart: bool = False
    _semaphore: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _spare: asyncio.subprocess.Process | None = field(default=None, init=False, repr=False)
    _children: dict[int, asyncio.subprocess.Process] = field(default_factory=dict, init=False,
                                                              repr=False)

    def __post_init__(self) -> None:
        if self.max_concurrent_syncs < 1:
            raise ValueError(f"max_concurrent_syncs is {self.max_concurrent_syncs}: pass 1 or "
                             "more")

    @property
    def running_pids(self) -> tuple[int, ...]:
        """Process ids of the children running now."""
        return tuple(self._children)

    def _limit(self) -> asyncio.Semaphore:
        # Created lazily so the semaphore belongs to the loop that runs the syncs.
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrent_syncs)
        return self._semaphore

    async def run(
        self,
        request: Mapping[str, Any],
        *,
        timeout_seconds: float,
        secrets: Sequence[str] = (),
        command: Sequence[str] = CHILD_COMMAND,
    ) -> ChildOutcome:
        """Run one sync child with ``request`` on its standard input and return its outcome.

        The timeout counts from the child's start, not from the wait for a free slot.
        ``secrets`` are removed from the kept standard error.  ``command`` is the child's
        argument list after the interpreter: :data:`CHILD_COMMAND` or :data:`PLAN_COMMAND`.
        """
        payload = json.dumps(request, default=str).encode("utf-8")
        async with self._limit():
            return await self._run_child(payload, timeout_seconds=timeout_seconds,
                                         secrets=secrets, command=tuple(command))

    async def _spawn(self, command: Sequence[str] = CHILD_COMMAND) -> asyncio.subprocess.Process:
        environment = {**os.environ, **self.extra_environment, "PYTHONUNBUFFERED": "1"}

        # A new session makes the child a process group leader, so a kill on timeout also
        # reaches anything it started.
        return await asyncio.create_subprocess_exec(
            self.python_executable, *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
            start_new_session=True,
        )

    async def _take_child(self) -> asyncio.subprocess.Process:
        """Return a started child: the spare one when it is alive, else a new one."""
        spare, self._spare = self._spare, None
        process = spare if spare is not None and spare.returncode is None else None
        if process is None:
            process = await self._spawn()

        # Replace the spare now, so it imports on a free core while this sync runs.
        await self.warm_up()
        return process

    async def warm_up(self) -> None:
        """Start a spare child unless one exists.

        The child imports its modules before it reads standard input, so a spare saves the
        next sync that start-up time (0.5 to 3 s, depending on the machine's load).
        """
        if self.prestart and self._spare is None:
            self._spare = await self._spawn()

    async def close(self) -> None:
        """Stop the spare child, if any."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.returncode is None:
            await self._stop(spare)

    async def _run_child(self, payload: bytes, *, timeout_seconds: float,
                         secrets: Sequence[str],
                         command: tuple[str, ...] = CHILD_COMMAND) -> ChildOutcome:
        started = time.monotonic()
        process = (await self._take_child() if command == CHILD_COMMAND
                   else await self._spawn(command))
        self._children[process.pid] = process
        timed_out = False
        try:
            try:
                stdout, stderr = await asyncio.wait_for(process.communicate(payload),
                                                        timeout=timeout_seconds)
            except TimeoutError:
                timed_out = True
                logger.warning("sync child %d timed out after %.0f s; stopping it",
                               process.pid, timeout_seconds)
                stdout, stderr = await self._stop(process)
        except asyncio.CancelledError:
            # The operator is shutting down: never leave an orphan running a migration.
            await self._stop(process)
            raise
        finally:
            self._children.pop(process.pid, None)

        duration_seconds = time.monotonic() - started
        stderr_text = stderr.decode("utf-8", errors="replace")[-STDERR_TAIL_CHARACTERS:]
        return ChildOutcome(
            exit_code=process.returncode,
            report=parse_report(stdout.decode("utf-8", errors="replace")),
            stderr_tail=redact_text(stderr_text, *secrets),
            timed_out=timed_out,
            duration_seconds=duration_seconds,
        )

    async def _stop(self, process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
        """Send SIGTERM to the child's group, then SIGKILL after the grace period."""
        for group_signal in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, group_signal)
            try:
                return await asyncio.wait_for(process.communicate(),
                                              timeout=TERMINATE_GRACE_SECONDS)
            except TimeoutError:
                continue
        return b"", b""


def parse_report(stdout: str) -> dict[str, Any] | None:
    """Return the JSON report the child printed, or None when there is none."""
    text = stdout.strip()
    if not text:
        return None

    # The report is the last JSON document on standard output.
    start = text.rfind("\n{")
    candidates = [text] if start < 0 else [text, text[start + 1:]]
    for candidate in candidates:
        try:
            loaded = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(loaded, dict) and "sync_id" in loaded:
            return loaded
    return None
