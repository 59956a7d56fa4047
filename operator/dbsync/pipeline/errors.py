"""Errors the pipeline raises, each with the exit code the CLI uses and a retry hint.

The operator reads :attr:`DbsyncError.transient` to choose between retrying with backoff
and marking the resource Stalled, and :attr:`DbsyncError.reason` as the condition reason.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def describe_kind(value: object, kinds: Sequence[tuple[type, str]]) -> str:
    """Name the kind of a parsed value in plain words, for messages about a bad file.

    ``kinds`` pairs types with words ("a list") and is searched in order, so a subclass
    such as ``bool`` (of ``int``) must come before its base class.
    """
    if value is None:
        return "null"
    for kind, description in kinds:
        if isinstance(value, kind):
            return description
    return f"a value of type {type(value).__name__}"
