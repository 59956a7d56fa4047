"""Double-entry integrity checks of a target ledger, and of its match with a source ledger.

:func:`run_ledger_checks` resolves the configured tables in the catalog, then runs every
selected check inside one ``REPEATABLE READ READ ONLY`` transaction, so all checks see the
same snapshot.  Each check runs in its own savepoint with its own ``statement_timeout``: a
check that times out reports TIMEOUT and the snapshot stays usable for the next one.

Results carry transaction ids, account ids, bucket names and counts.  Amounts stay in
:attr:`CheckResult.details`, which :meth:`LedgerResult.to_dict` includes only when asked
to (for the audit trail).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

import psycopg

from dbsync.pipeline import dsn as dsn_tools
from dbsync.pipeline.errors import ConfigurationError, ConnectionFailedError, LockTimeoutError
from dbsync.pipeline.ledger_checks import (
    Bucket,
    CheckOutcome,
    Connection,
    TransactionSummary,
    can_split_transactions,
    check_field_sanity,
    check_minimum_legs,
    check_mixed_currency,
    check_orphans,
    check_stored_balances,
    check_transaction_balance,
    check_trial_balance,
    compare_fingerprints,
    fingerprint_buckets,
    summarize_transactions,
)
from dbsync.pipeline.ledger_config import (
    CheckName,
    LedgerConfig,
    load_ledger_config,
    parse_ledger_config,
)
from dbsync.pipeline.ledger_sql import LedgerSchema, resolve_ledger

__all__ = [
    "CheckName",
    "CheckResult",
    "CheckStatus",
    "LedgerConfig",
    "LedgerResult",
    "load_ledger_config",
    "parse_ledger_config",
    "run_ledger_checks",
]

logger = logging.getLogger("dbsync.ledger")


class CheckStatus(StrEnum):
    """Outcome of one check.  Only PASS and SKIPPED count as balanced."""

    PASS = "PASS"  # noqa: S105 - a check status, not a password
    FAIL = "FAIL"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class CheckResult:
    """Result of one check.  ``details`` contains amounts and belongs in the audit trail only."""

    name: CheckName
    status: CheckStatus
    rows_examined: int
    violations: int
    offending_keys: tuple[str, ...]
    duration_ms: float
    message: str
    details: Mapping[str, object] = field(default_factory=dict)

    def to_dict(self, *, include_amounts: bool = False) -> dict[str, object]:
        """Return a JSON-safe mapping; ``details`` only with ``include_amounts=True``."""
        data: dict[str, object] = {
            "name": self.name.value,
            "status": self.status.value,
            "rows_examined": self.rows_examined,
            "violations": self.violations,
            "offending_keys": list(self.offending_keys),
            "duration_ms": round(self.duration_ms, 1),
            "message": self.message,
        }
        if include_amounts:
            data["details"] = dict(self.details)
        return data


@dataclass(frozen=True)
class LedgerResult:
    """Results of all selected checks, in the order they ran."""

    checks: tuple[CheckResult, ...]

    @property
    def balanced(self) -> bool:
        """Whether every selected check passed or was skipped."""
        return all(check.status in (CheckStatus.PASS, CheckStatus.SKIPPED)
                   for check in self.checks)

    @property
    def failed_checks(self) -> tuple[CheckName, ...]:
        """Names of the checks that did not pass or skip."""
        return tuple(check.name for check in self.checks
                     if check.status not in (CheckStatus.PASS, CheckStatus.SKIPPED))

    def to_dict(self, include_amounts: bool = False) -> dict[str, object]:
        """Return a JSON-safe mapping; amounts only with ``include_amounts=True``."""
        return {
            "balanced": self.balanced,
            "failed_checks": [name.value for name in self.failed_checks],
            "checks": [check.to_dict(include_amounts=include_amounts) for check in self.checks],
        }

    def render_text(self, *, include_amounts: bool = False) -> str:
        """Render one line per check, with offending keys and, if asked, amounts."""
        failed = ", ".join(name.value for name in self.failed_checks)
        if self.balanced:
            verdict = "balanced"
        elif any(check.status is CheckStatus.FAIL for check in self.checks):
            verdict = f"NOT balanced: {failed}"
        else:
            # A check that timed out or could not run proves nothing either way.
            verdict = f"no verdict: {failed} did not finish"
        lines = [f"ledger: {verdict}"]
        for check in self.checks:
            lines.append(
                f"  {check.status.value:<8} {check.name.value:<20} "
                f"{check.rows_examined} rows, {check.violations} violation(s), "
                f"{check.duration_ms:.0f} ms: {check.message}")
            if check.offending_keys:
                lines.append(f"           first offending keys: {', '.join(check.offending_keys)}")
            if include_amounts and check.details:
                lines.append(f"           details: {dict(check.details)}")
        return "\n".join(lines)


CheckFunction = Callable[..., CheckOutcome]

_TARGET_CHECKS: dict[CheckName, CheckFunction] = {
    CheckName.TRANSACTION_BALANCE: check_transaction_balance,
    CheckName.MINIMUM_LEGS: check_minimum_legs,
    CheckName.TRIAL_BALANCE: check_trial_balance,
    CheckName.STORED_BALANCES: check_stored_balances,
    CheckName.FIELD_SANITY: check_field_sanity,
    CheckName.MIXED_CURRENCY: check_mixed_currency,
    CheckName.ORPHANS: check_orphans,
}


# Checks that group all postings by transaction and can share one pass.
_GROUPED_CHECKS = frozenset({CheckName.TRANSACTION_BALANCE, CheckName.MINIMUM_LEGS,
                             CheckName.MIXED_CURRENCY})


def _set_statement_timeout(connection: Connection, timeout_ms: int) -> None:
    # set_config(..., true) is SET LOCAL: it ends with the transaction, or with the savepoint
    # when that is rolled back.
    connection.execute("SELECT set_config('statement_timeout', %s, true)", [f"{timeout_ms}ms"])


@contextmanager
def _snapshot(dsn: str, *, role: str, timeout_ms: int) -> Iterator[Connection]:
    """Open a connection holding one REPEATABLE READ READ ONLY transaction."""
    with dsn_tools.connect(dsn, role=role) as connection:
        connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        connection.read_only = True
        with connection.transaction():
            _set_statement_timeout(connection, timeout_ms)
            yield connection


def _resolve(connection: Connection, config: LedgerConfig, *, dsn: str,
             role: str) -> LedgerSchema:
    """Resolve the ledger in the catalog, naming the database in any configuration error."""
    try:
        return resolve_ledger(connection, config)
    except ConfigurationError as error:
        address = dsn_tools.describe(dsn, role=role)
        raise ConfigurationError(f"{role} database {address}: {error}") from None


def _run_timed(name: CheckName, connection: Connection, timeout_ms: int, dsn_secret: str,
               run: Callable[[], CheckOutcome], *, log_label: str | None = None) -> CheckResult:
    """Run one check in a savepoint with its own statement timeout and time it.

    ``log_label`` names the step in the log line when it is only part of the check.
    """
    label = log_label or name.value
    started = time.monotonic()
    status = CheckStatus.ERROR
    outcome: CheckOutcome | None = None
    message = ""
    try:
        with connection.transaction():
            _set_statement_timeout(connection, timeout_ms)
            outcome = run()
        status = CheckStatus.FAIL if outcome.violations else CheckStatus.PASS
    except psycopg.errors.QueryCanceled:
        status = CheckStatus.TIMEOUT
        message = f"timed out after statement_timeout of {timeout_ms} ms: no verdict"
    except psycopg.Error as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else (
            type(error).__name__)
        message = f"failed: {dsn_tools.redact_text(first_line, dsn_secret)}"
    duration_ms = (time.monotonic() - started) * 1000.0

    if outcome is None:
        logger.warning("ledger check %s: %s (%.0f ms)", label, status.value, duration_ms)
        return CheckResult(name=name, status=status, rows_examined=0, violations=0,
                           offending_keys=(), duration_ms=duration_ms, message=message)
    logger.info("ledger check %s: %s, %d violations in %d rows (%.0f ms)", label,
                status.value, outcome.violations, outcome.rows_examined, duration_ms)
    return CheckResult(name=name, status=status, rows_examined=outcome.rows_examined,
                       violations=outcome.violations, offending_keys=outcome.offending_keys,
                       duration_ms=duration_ms, message=outcome.message,
                       details=outcome.details)


def _skipped(name: CheckName, message: str) -> CheckResult:
    return CheckResult(name=name, status=CheckStatus.SKIPPED, rows_examined=0, violations=0,
                       offending_keys=(), duration_ms=0.0, message=message)


def run_ledger_checks(*, target_dsn: str, config: LedgerConfig,
                      source_dsn: str | None = None) -> LedgerResult:
    """Run the selected ledger checks on ``target_dsn`` and return one result per check.

    ``source_dsn`` is read only by the fingerprint check.  When the configuration selects no
    checks, every check it can run is selected, and fingerprint is SKIPPED without a source.
    Raises ConfigurationError for a missing table or column or an unusable selection, and
    ConnectionFailedError when a database cannot be reached.  Nothing is written.
    """
    selected = config.selected_checks()
    if CheckName.FINGERPRINT in selected and source_dsn is None and config.checks is not None:
        raise ConfigurationError(
            "check fingerprint compares source and target: pass a source DSN (--source) or "
            "leave fingerprint out of the selected checks")
    target_secret = dsn_tools.password_of(target_dsn)

    try:
        return _run_all(target_dsn=target_dsn, config=config, source_dsn=source_dsn,
                        selected=selected)
    except psycopg.errors.QueryCanceled:
        # Checks catch their own timeouts, so this one hit the catalog lookup.
        raise LockTimeoutError(
            f"the catalog lookup of the ledger tables exceeded statementTimeoutMs "
            f"({config.statement_timeout_ms} ms) before any check ran: raise "
            "statementTimeoutMs if it is below a few hundred milliseconds, or retry when "
            "the schema change that holds a lock on these tables has finished") from None
    except psycopg.OperationalError as error:
        # A connection lost between checks surfaces here, when the snapshot is closed.
        detail = dsn_tools.redact_text(str(error).strip(), target_secret,
                                       dsn_tools.password_of(source_dsn or ""))
        raise ConnectionFailedError(
            f"lost the connection during the ledger checks: {detail}; check that the "
            "database is up and run the checks again") from None


def _run_all(*, target_dsn: str, config: LedgerConfig, source_dsn: str | None,
             selected: tuple[CheckName, ...]) -> LedgerResult:
    timeout_ms = config.statement_timeout_ms
    limit = config.max_offending_keys
    target_secret = dsn_tools.password_of(target_dsn)
    results: list[CheckResult] = []
    with _snapshot(target_dsn, role="target", timeout_ms=timeout_ms) as target:
        schema = _resolve(target, config, dsn=target_dsn, role="target")
        for warning in schema.float_columns:
            logger.warning("ledger money column %s is floating point: checks use its text form "
                           "as an exact decimal", warning)

        # Per-transaction checks share one grouping pass, which runs inside the first of
        # them and is timed with it.  A single grouped check uses the pass only when it can
        # read transaction ranges in parallel, because otherwise its own query is cheaper.
        grouped = _GROUPED_CHECKS.intersection(selected)
        if len(grouped) < 2 and not can_split_transactions(schema):
            grouped = frozenset()

        # The pass also serves orphans (a header lookup per transaction) and trial_balance
        # (totals per currency) when they run, so neither reads every posting again.
        headers_in_pass = (CheckName.ORPHANS in selected and bool(grouped)
                           and schema.transactions is not None)
        totals_in_pass = CheckName.TRIAL_BALANCE in selected and bool(grouped)
        pass_users = set(grouped)
        if headers_in_pass:
            pass_users.add(CheckName.ORPHANS)
        if totals_in_pass:
            pass_users.add(CheckName.TRIAL_BALANCE)
        summary: TransactionSummary | None = None
        pass_timed_out = False

        def run_check(name: CheckName) -> CheckOutcome:
            nonlocal summary, pass_timed_out
            check = _TARGET_CHECKS[name]
            if name not in pass_users or pass_timed_out:
                return check(schema, target, limit=limit)
            if summary is None:
                try:
                    # A savepoint of its own keeps the check's savepoint usable after a
                    # timeout, so the check can still run its own query.
                    with target.transaction():
                        summary = summarize_transactions(
                            schema, target, with_headers=headers_in_pass,
                            with_currency_totals=totals_in_pass)
                except psycopg.errors.QueryCanceled:
                    # A second try would time out again, so every check that needed the
                    # pass runs its own query, each with the full statement timeout.
                    pass_timed_out = True
                    logger.warning("ledger: the shared per-transaction pass timed out after "
                                   "statementTimeoutMs (%d ms), so each check runs its own "
                                   "query instead", timeout_ms)
                    return check(schema, target, limit=limit)
            return check(schema, target, limit=limit, summary=summary)

        for name in selected:
            if name is CheckName.FINGERPRINT:
                continue
            run = functools.partial(run_check, name)
            results.append(_run_timed(name, target, timeout_ms, target_secret, run))

        if CheckName.FINGERPRINT in selected:
            if source_dsn is None:
                results.append(_skipped(CheckName.FINGERPRINT,
                                        "no source database given to compare with"))
            else:
                results.append(_run_fingerprint(
                    target=target, target_schema=schema, source_dsn=source_dsn,
                    config=config, timeout_ms=timeout_ms, secret=target_secret))
    return LedgerResult(checks=tuple(results))


def _run_fingerprint(*, target: Connection, target_schema: LedgerSchema, source_dsn: str,
                     config: LedgerConfig, timeout_ms: int, secret: str) -> CheckResult:
    """Fingerprint the source in its own snapshot, then the target in the shared one."""
    source_secret = dsn_tools.password_of(source_dsn)
    with _snapshot(source_dsn, role="source", timeout_ms=timeout_ms) as source:
        source_schema = _resolve(source, config, dsn=source_dsn, role="source")
        source_buckets: dict[str, Bucket] = {}

        def fingerprint_source() -> CheckOutcome:
            source_buckets.update(fingerprint_buckets(source_schema, source))
            return CheckOutcome(rows_examined=0, violations=0, offending_keys=(), message="")

        source_result = _run_timed(CheckName.FINGERPRINT, source, timeout_ms,
                                   source_secret, fingerprint_source,
                                   log_label="fingerprint (reading the source)")
    if source_result.status is not CheckStatus.PASS:
        return CheckResult(name=CheckName.FINGERPRINT, status=source_result.status,
                           rows_examined=0, violations=0, offending_keys=(),
                           duration_ms=source_result.duration_ms,
                           message=f"source {source_result.message}")

    def fingerprint_target() -> CheckOutcome:
        target_buckets = fingerprint_buckets(target_schema, target)
        return compare_fingerprints(source_buckets, target_buckets,
                                    limit=config.max_offending_keys)

    result = _run_timed(CheckName.FINGERPRINT, target, timeout_ms, secret, fingerprint_target)
    return CheckResult(name=result.name, status=result.status,
                       rows_examined=result.rows_examined, violations=result.violations,
                       offending_keys=result.offending_keys,
                       duration_ms=result.duration_ms + source_result.duration_ms,
                       message=result.message, details=result.details)

