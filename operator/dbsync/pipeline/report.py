"""The sync report: step outcomes, success criteria, the verdict, and its text and JSON forms.

The report contains counts, names and ids only.  Amounts and the full SQL stay in the audit
trail, found by the sync id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dbsync.pipeline.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE


class StepResult(StrEnum):
    """Outcome of one pipeline step."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    ERROR = "Error"


class SyncResult(StrEnum):
    """Verdict of the whole sync."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True, kw_only=True)
class StepReport:
    """One step's outcome, duration and the audit operation that recorded it."""

    name: str
    result: StepResult
    duration_ms: int
    operation_id: str | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "result": self.result.value,
            "duration_ms": self.duration_ms,
            "operation_id": self.operation_id,
            "message": self.message,
        }


@dataclass(frozen=True, kw_only=True)
class Criterion:
    """One success criterion; ``counted=False`` marks an informational one (dry run)."""

    name: str
    ok: bool
    detail: str
    counted: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "counted": self.counted}


@dataclass(frozen=True, kw_only=True)
class ErrorReport:
    """The error that stopped the sync, already redacted."""

    reason: str
    message: str
    transient: bool
    exit_code: int

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message, "transient": self.transient}


@dataclass(frozen=True, kw_only=True)
class SyncReport:
    """Everything one sync run produced, for people (text) and machines (JSON)."""

    sync_id: str
    trace_id: str
    dry_run: str
    steps: tuple[StepReport, ...] = ()
    criteria: tuple[Criterion, ...] = ()
    migration: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    error: ErrorReport | None = None
    audit_operations: tuple[dict[str, Any], ...] = field(default=())

    @property
    def result(self) -> SyncResult:
        if self.error is not None:
            return SyncResult.FAILED
        if all(criterion.ok for criterion in self.criteria if criterion.counted):
            return SyncResult.SUCCEEDED
        return SyncResult.FAILED

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error.exit_code
        return EXIT_OK if self.result is SyncResult.SUCCEEDED else EXIT_FAILED

    def to_dict(self) -> dict[str, Any]:
        return {
            "sync_id": self.sync_id,
            "trace_id": self.trace_id,
            "result": self.result.value,
            "exit_code": self.exit_code,
            "dry_run": self.dry_run,
            "steps": [step.to_dict() for step in self.steps],
            "criteria": [criterion.to_dict() for criterion in self.criteria],
            "migration": self.migration,
            "drift": self.drift,
            "ledger": self.ledger,
            "plan": self.plan,
            "error": self.error.to_dict() if self.error else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str)

    def render_text(self) -> str:
        """Return the report as aligned text for a terminal."""
        lines = [f"sync {self.sync_id}  (trace {self.trace_id})"]
        if self.dry_run != "off":
            lines.append(f"dry run: {self.dry_run} (nothing was applied to the target)")
        lines.append("")
        lines.append("steps:")
        for step in self.steps:
            message = f"  {step.message}" if step.message else ""
            lines.append(
                f"  {step.name:<10} {step.result.value:<10} {step.duration_ms:>7} ms{message}")
        if self.migration:
            lines.append("")
            lines.append("migration:")
            lines.append(f"  revision before: {self.migration.get('revision_before')}")
            lines.append(f"  revision after:  {self.migration.get('revision_after')}")
            for outcome in self.migration.get("outcomes", []):
                lines.append(
                    f"  {outcome.get('status', ''):<12} {outcome.get('revision', '')}  "
                    f"{outcome.get('description', '')} ({outcome.get('duration_ms', 0)} ms)")
        if self.drift is not None:
            summary = self.drift.get("summary", {})
            differences = self.drift.get("differences", [])
            lines.append("")
            tables = summary.get("tables", {})
            columns = summary.get("columns", {})
            lines.append(
                f"schema: {len(differences)} schema differences; tables source "
                f"{tables.get('source')} / target {tables.get('target')}, columns source "
                f"{columns.get('source')} / target {columns.get('target')}")
            for difference in differences:
                lines.append(
                    f"  [{difference.get('hazard')}] {difference.get('kind')} "
                    f"{difference.get('name')} {difference.get('property')}: "
                    f"source={difference.get('source')!r} target={difference.get('target')!r}")
        if self.ledger is not None:
            lines.append("")
            verdict = "ledger balanced" if self.ledger.get("balanced") else "ledger NOT balanced"
            lines.append(f"ledger: {verdict}")
            for check in self.ledger.get("checks", []):
                keys = ", ".join(str(key) for key in check.get("offending_keys", [])[:20])
                suffix = f" offending: {keys}" if keys else ""
                violations = check.get("violations", 0)
                noun = "violation" if violations == 1 else "violations"
                lines.append(
                    f"  {check.get('status', ''):<8} {check.get('name', '')} "
                    f"({violations} {noun}){suffix}")
        lines.append("")
        lines.append("criteria:")
        for criterion in self.criteria:
            # A criterion that is not counted cannot fail the sync, such as a dry run's
            # skipped ledger step, so it is marked info rather than FAIL.
            mark = "ok  "
            if not criterion.ok:
                mark = "FAIL" if criterion.counted else "info"
            note = "" if criterion.counted else " (informational)"
            lines.append(f"  {mark} {criterion.name}: {criterion.detail}{note}")
        if self.error is not None:
            lines.append("")
            lines.append(f"error ({self.error.reason}): {self.error.message}")
        lines.append("")
        counted_note = ("; informational criteria are not counted in a dry run"
                        if self.dry_run != "off" else "")
        lines.append(f"result: {self.result.value} (exit {self.exit_code}{counted_note})")
        return "\n".join(lines)


def usage_error_report(*, sync_id: str, trace_id: str, dry_run: str, reason: str, message: str,
                       transient: bool) -> SyncReport:
    """Return a report for a sync that stopped before it could be audited."""
    return SyncReport(
        sync_id=sync_id, trace_id=trace_id, dry_run=dry_run,
        error=ErrorReport(reason=reason, message=message, transient=transient,
                          exit_code=EXIT_USAGE),
    )
