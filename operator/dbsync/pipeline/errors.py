"""Errors the pipeline raises, each with the exit code the CLI uses and a retry hint.

The operator reads :attr:`DbsyncError.transient` to choose between retrying with backoff
and marking the resource Stalled, and :attr:`DbsyncError.reason` as the condition reason.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class DbsyncError(Exception):
    """Base class: a message for people, a stable CamelCase reason and an exit code."""

    reason: str = "SyncFailed"
    exit_code: int = EXIT_FAILED
    transient: bool = False

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigurationError(DbsyncError):
    """Invalid options, files or DSNs: nothing ran, and retrying will not help."""

    reason = "InvalidSpec"
    exit_code = EXIT_USAGE


class ConnectionFailedError(DbsyncError):
    """A database could not be reached or refused the login."""

    reason = "DatabaseUnreachable"
    exit_code = EXIT_USAGE
    transient = True


class LockTimeoutError(DbsyncError):
    """The advisory lock or a table lock was not granted in time."""

    reason = "LockTimeout"
    transient = True


class MigrationFailedError(DbsyncError):
    """A revision failed; the message names it and says what was rolled back."""

    reason = "MigrationFailed"


class AuditUnavailableError(DbsyncError):
    """The audit table cannot be written, so the sync must not proceed (fail closed)."""

    reason = "AuditUnavailable"
    exit_code = EXIT_USAGE
    transient = True
