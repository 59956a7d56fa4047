"""Options, results and errors of the migrate step.

Kept apart from :mod:`dbsync.pipeline.migrate` so the code that drives Alembic and the
public entry point can both import them without a cycle.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from dbsync.pipeline.errors import ConfigurationError, LockTimeoutError, MigrationFailedError

# lock_timeout: a DDL statement queued behind a long transaction blocks every later query
# on that table while it waits, so it must give up quickly. 5 s caps that stall at what
# an online service usually tolerates, and the retries below cover short conflicts.
DEFAULT_LOCK_TIMEOUT_MS = 5_000
# statement_timeout: a backstop for a runaway statement (a rewrite or index build on a
# table far larger than expected) that still lets ordinary index builds on tables of a few
# GB finish. Raise it for known long steps instead of disabling it.
DEFAULT_STATEMENT_TIMEOUT_MS = 600_000
DEFAULT_LOCK_RETRIES = 3
DEFAULT_RETRY_BACKOFF_SECONDS = 0.5

_EnumT = TypeVar("_EnumT", bound=StrEnum)


class TransactionMode(StrEnum):
    """Transaction layout of a run: one for all pending revisions, or one per revision."""

    ALL = "all"
    PER_REVISION = "per-revision"


class DryRunMode(StrEnum):
    """Whether revisions are applied, rendered as SQL, or run and rolled back."""

    OFF = "off"
    PLAN = "plan"
    REHEARSE = "rehearse"


class OutcomeStatus(StrEnum):
    """Result status of one revision in a run."""

    APPLIED = "applied"
    PLANNED = "planned"
    REHEARSED = "rehearsed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    NOT_RUN = "not_run"
    DOWNGRADED = "downgraded"


@dataclass(frozen=True, kw_only=True)
class MigrateOptions:
    """Target revision and run settings. The enum fields also accept their string values."""

    migrations_dir: Path
    revision: str = "head"
    transaction_mode: TransactionMode = TransactionMode.ALL
    dry_run: DryRunMode = DryRunMode.OFF
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS
    lock_retries: int = DEFAULT_LOCK_RETRIES
    retry_backoff_seconds: float = DEFAULT_RETRY_BACKOFF_SECONDS
    allow_downgrade: bool = False

    def __post_init__(self) -> None:
        # Why: the CLI and the operator pass plain strings; normalize them once here.
        object.__setattr__(self, "migrations_dir", Path(self.migrations_dir))
        object.__setattr__(self, "transaction_mode",
                           _parse_enum(TransactionMode, self.transaction_mode, "transaction mode"))
        object.__setattr__(self, "dry_run", _parse_enum(DryRunMode, self.dry_run, "dry-run mode"))
        if not str(self.revision).strip():
            raise ConfigurationError(
                "the target revision is empty: pass 'head', 'source' or a revision id")
        for name in ("lock_timeout_ms", "statement_timeout_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigurationError(
                    f"{name} must be a positive number of milliseconds, not {value!r}")
        if self.lock_retries < 0:
            raise ConfigurationError(f"lock_retries must be 0 or more, not {self.lock_retries}")
        if self.retry_backoff_seconds < 0:
            raise ConfigurationError(
                f"retry_backoff_seconds must be 0 or more, not {self.retry_backoff_seconds}")


def _parse_enum(kind: type[_EnumT], value: object, label: str) -> _EnumT:
    try:
        return kind(str(value))
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ConfigurationError(f"invalid {label} {value!r}: use one of {choices}") from None


@dataclass(frozen=True)
class RevisionOutcome:
    """One revision's result: what was planned, measured or applied, and its audit operation."""

    revision: str
    file_name: str
    description: str
    status: str
    duration_ms: int
    transactional: bool
    sql: str | None = None
    warnings: tuple[str, ...] = ()
    operation_id: uuid.UUID | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "file_name": self.file_name,
            "description": self.description,
            "status": str(self.status),
            "duration_ms": self.duration_ms,
            "transactional": self.transactional,
            "sql": self.sql,
            "warnings": list(self.warnings),
            "operation_id": str(self.operation_id) if self.operation_id else None,
        }


@dataclass(frozen=True)
class MigrateResult:
    """The migrate step's result: revisions before and after, and one outcome per revision."""

    revision_before: str | None
    revision_after: str | None
    target_revision: str | None
    outcomes: tuple[RevisionOutcome, ...]
    dry_run: DryRunMode
    invalid_indexes: tuple[str, ...] = ()
    transaction_mode: TransactionMode = TransactionMode.ALL
    warnings: tuple[str, ...] = ()
    lock_retries_used: int = 0

    @property
    def applied(self) -> tuple[str, ...]:
        """Ids of the revisions this run committed, oldest first."""
        return tuple(outcome.revision for outcome in self.outcomes
                     if outcome.status == OutcomeStatus.APPLIED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision_before": self.revision_before,
            "revision_after": self.revision_after,
            "target_revision": self.target_revision,
            "dry_run": str(self.dry_run),
            "transaction_mode": str(self.transaction_mode),
            "applied": list(self.applied),
            "outcomes": [outcome.to_dict() for outcome in self.outcomes],
            "invalid_indexes": list(self.invalid_indexes),
            "warnings": list(self.warnings),
            "lock_retries_used": self.lock_retries_used,
        }

    def render_text(self) -> str:
        """Render a short human-readable summary, one line per revision."""
        mode = {DryRunMode.OFF: "apply", DryRunMode.PLAN: "plan",
                DryRunMode.REHEARSE: "rehearse"}[self.dry_run]
        lines = [f"migrate ({mode}, transaction mode {self.transaction_mode}): "
                 f"{self.revision_before or 'base'} -> {self.revision_after or 'base'} "
                 f"(target {self.target_revision or 'base'})"]
        if not self.outcomes:
            lines.append("  nothing to do: the target is already at the requested revision")
        for outcome in self.outcomes:
            atomic = "" if outcome.transactional else "  [not transactional]"
            lines.append(f"  {outcome.status:<11} {outcome.revision}  {outcome.file_name}  "
                         f"{outcome.duration_ms} ms{atomic}")
            lines.extend(f"      warning: {warning}" for warning in outcome.warnings)
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        if self.invalid_indexes:
            lines.append("  INVALID indexes: " + ", ".join(self.invalid_indexes))
        return "\n".join(lines)


class NonTransactionalRevisionError(ConfigurationError):
    """A revision cannot run inside the single transaction that ``all`` mode requires."""

    reason = "NonTransactionalRevision"


class RevisionChecksumMismatchError(ConfigurationError):
    """An already-applied revision file changed on disk since it was applied."""

    reason = "RevisionChecksumMismatch"


class TargetAheadError(ConfigurationError):
    """The target is past the requested revision and downgrades were not allowed."""

    reason = "TargetAhead"


class RevisionFailedError(MigrationFailedError):
    """A revision failed. ``result`` contains the outcome of every revision in the run."""

    def __init__(self, message: str, *, result: MigrateResult | None = None,
                 revision: str | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.revision = revision


class MigrationLockTimeoutError(LockTimeoutError):
    """A revision kept hitting lock_timeout after every retry; ``result`` holds the outcomes."""

    def __init__(self, message: str, *, result: MigrateResult | None = None,
                 revision: str | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.revision = revision
