"""Condition bookkeeping and the verdicts and statuses built from sync reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dbsync.k8s.conditions import (
    ConditionType,
    ConditionUpdate,
    Reason,
    apply_updates,
    find_condition,
    settled,
)
from dbsync.k8s.executor import ChildOutcome, parse_report
from dbsync.k8s.scheduler import parse_duration_seconds, retry_delay_seconds
from dbsync.k8s.status import (
    SyncContext,
    Trigger,
    VerdictKind,
    escalate,
    finished_status,
    judge,
    starting_status,
)
from dbsync.pipeline.report import Criterion, ErrorReport, StepReport, StepResult, SyncReport

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SYNC_ID = "5f0c7f5e-0000-4000-8000-000000000001"


def _report(*, criteria: tuple[Criterion, ...] = (), error: ErrorReport | None = None,
            drift: dict[str, Any] | None = None,
            ledger: dict[str, Any] | None = None) -> dict[str, Any]:
    report = SyncReport(
        sync_id=SYNC_ID, trace_id=SYNC_ID.replace("-", ""), dry_run="off",
        steps=(StepReport(name="migrate", result=StepResult.SUCCEEDED, duration_ms=12,
                          operation_id="op-1"),),
        criteria=criteria, error=error,
        migration={"revision_before": None, "revision_after": "0006", "target_revision": "0006",
                   "applied": ["0001", "0006"], "outcomes": []},
        drift=drift if drift is not None else {"summary": {}, "differences": []},
        ledger=ledger,
    )
    return report.to_dict()


def _outcome(report: dict[str, Any] | None, *, exit_code: int = 0,
             timed_out: bool = False) -> ChildOutcome:
    return ChildOutcome(exit_code=exit_code, report=report, stderr_tail="", timed_out=timed_out,
                        duration_seconds=1.0)


def _context(**changes: Any) -> SyncContext:
    fields: dict[str, Any] = {
        "sync_id": SYNC_ID, "trigger": Trigger.CREATE, "started_at": T0,
        "finished_at": T0 + timedelta(seconds=2), "generation": 3, "dry_run": "off",
        "run_migrations": True, "fail_on_drift": True, "backoff_limit": 6}
    fields.update(changes)
    return SyncContext(**fields)


def test_transition_time_kept_while_status_unchanged() -> None:
    first = apply_updates([], settled(ready=True, reason="Succeeded", message="a"),
                          generation=1, now=T0)
    second = apply_updates(first, settled(ready=True, reason="Succeeded", message="b"),
                           generation=2, now=T0 + timedelta(minutes=5))
    ready = find_condition(second, ConditionType.READY) or {}
    assert ready["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert ready["observedGeneration"] == 2
    assert ready["message"] == "b"


def test_transition_time_moves_when_status_changes() -> None:
    first = apply_updates([], settled(ready=True, reason="Succeeded", message="a"),
                          generation=1, now=T0)
    second = apply_updates(first, settled(ready=False, reason="DriftDetected", message="b"),
                           generation=1, now=T0 + timedelta(minutes=5))
    ready = find_condition(second, ConditionType.READY) or {}
    assert ready["lastTransitionTime"] == "2026-01-01T12:05:00Z"


def test_conditions_keep_standard_order_and_untouched_types() -> None:
    first = apply_updates([], [ConditionUpdate(type=ConditionType.LEDGER_BALANCED, status=True,
                                               reason="Balanced", message="")],
                          generation=1, now=T0)
    merged = apply_updates(first, settled(ready=True, reason="Succeeded", message=""),
                           generation=1, now=T0)
    assert [condition["type"] for condition in merged] == [
        "Ready", "Reconciling", "Stalled", "LedgerBalanced"]


def test_unknown_status_for_none() -> None:
    conditions = apply_updates([], [ConditionUpdate(type=ConditionType.LEDGER_BALANCED,
                                                    status=None, reason="NotConfigured",
                                                    message="")], generation=None, now=T0)
    assert conditions[0]["status"] == "Unknown"
    assert "observedGeneration" not in conditions[0]


def test_clean_report_succeeds() -> None:
    verdict = judge(_outcome(_report(criteria=(Criterion(name="no_errors", ok=True,
                                                          detail=""),))),
                    sync_id=SYNC_ID, fail_on_drift=True, timeout_seconds=60)
    assert verdict.kind is VerdictKind.SUCCEEDED
    assert SYNC_ID in verdict.message


def test_drift_is_not_ready_unless_tolerated() -> None:
    drifted = _report(criteria=(Criterion(name="no_schema_differences", ok=False, detail="2"),),
                      drift={"summary": {}, "differences": [{"kind": "column"}]})
    strict = judge(_outcome(drifted), sync_id=SYNC_ID, fail_on_drift=True, timeout_seconds=60)
    tolerant = judge(_outcome(drifted), sync_id=SYNC_ID, fail_on_drift=False,
                     timeout_seconds=60)
    assert (strict.kind, strict.reason) == (VerdictKind.NOT_READY, Reason.DRIFT_DETECTED)
    assert tolerant.kind is VerdictKind.SUCCEEDED


@pytest.mark.parametrize(("reason", "transient", "kind"), [
    ("DatabaseUnreachable", True, VerdictKind.TRANSIENT),
    ("LockTimeout", True, VerdictKind.TRANSIENT),
    ("MigrationFailed", False, VerdictKind.PERMANENT),
    ("InvalidSpec", False, VerdictKind.PERMANENT),
])
def test_error_reports_keep_reason_and_transience(reason: str, transient: bool,
                                                  kind: VerdictKind) -> None:
    report = _report(error=ErrorReport(reason=reason, message="boom", transient=transient,
                                       exit_code=2))
    verdict = judge(_outcome(report, exit_code=2), sync_id=SYNC_ID, fail_on_drift=True,
                    timeout_seconds=60)
    assert (verdict.kind, verdict.reason) == (kind, reason)


def test_timeout_and_kill_are_transient() -> None:
    timed_out = judge(_outcome(None, exit_code=-9, timed_out=True), sync_id=SYNC_ID,
                      fail_on_drift=True, timeout_seconds=60)
    killed = judge(_outcome(None, exit_code=-9), sync_id=SYNC_ID, fail_on_drift=True,
                   timeout_seconds=60)
    assert (timed_out.kind, timed_out.reason) == (VerdictKind.TRANSIENT, Reason.SYNC_TIMED_OUT)
    assert (killed.kind, killed.reason) == (VerdictKind.TRANSIENT, Reason.SYNC_INTERRUPTED)


def test_backoff_limit_turns_transient_into_stalled() -> None:
    report = _report(error=ErrorReport(reason="DatabaseUnreachable", message="down",
                                       transient=True, exit_code=2))
    verdict = judge(_outcome(report, exit_code=2), sync_id=SYNC_ID, fail_on_drift=True,
                    timeout_seconds=60)
    below = escalate(verdict, failures=2, backoff_limit=3)
    reached = escalate(verdict, failures=3, backoff_limit=3)
    assert below.kind is VerdictKind.TRANSIENT
    assert (reached.kind, reached.reason) == (VerdictKind.PERMANENT,
                                              Reason.BACKOFF_LIMIT_EXCEEDED)


def test_finished_status_summarises_without_amounts() -> None:
    report = _report(
        criteria=(Criterion(name="ledger_balanced", ok=False, detail="failed"),),
        drift={"summary": {}, "differences": [{"kind": "column"}, {"kind": "column"},
                                              {"kind": "index"}]},
        ledger={"balanced": False, "failed_checks": ["transaction_balance"],
                "checks": [{"name": "transaction_balance", "status": "FAIL",
                            "violations": 1}]})
    verdict = judge(_outcome(report), sync_id=SYNC_ID, fail_on_drift=True, timeout_seconds=60)
    status = finished_status({"failures": 2}, report=report, verdict=verdict,
                             context=_context(run_at="now"))
    assert status["drift"] == {"inSync": False, "differences": 3,
                               "byKind": {"column": 2, "index": 1}}
    assert status["ledger"] == {"balanced": False, "failedChecks": ["transaction_balance"]}
    assert status["migration"] == {"currentRevision": "0006", "targetRevision": "0006",
                                   "applied": 2}
    assert status["lastSync"]["steps"] == [{"name": "migrate", "operationId": "op-1",
                                            "result": "Succeeded", "durationMs": 12}]
    assert status["lastSync"]["durationMs"] == 2000
    assert status["failures"] == 0
    assert status["lastHandledRunAt"] == "now"
    assert status["observedGeneration"] == 3


def test_failed_sync_counts_failures() -> None:
    report = _report(error=ErrorReport(reason="LockTimeout", message="busy", transient=True,
                                       exit_code=1))
    verdict = judge(_outcome(report, exit_code=1), sync_id=SYNC_ID, fail_on_drift=True,
                    timeout_seconds=60)
    status = finished_status({"failures": 2}, report=report, verdict=verdict,
                             context=_context())
    reconciling = find_condition(status["conditions"], ConditionType.RECONCILING) or {}
    assert status["failures"] == 3
    assert reconciling["status"] == "True"
    assert status["lastSync"]["result"] == "Error"


def test_parse_report_takes_last_json_document() -> None:
    text = 'noise\n{"sync_id": "a", "result": "Failed"}\n'
    assert parse_report(text) == {"sync_id": "a", "result": "Failed"}
    assert parse_report("not json") is None


@pytest.mark.parametrize(("text", "seconds"), [("2s", 2.0), ("5m", 300.0), ("1h30m", 5400.0),
                                               ("250ms", 0.25)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration_seconds(text) == seconds


def test_parse_duration_rejects_prose() -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration_seconds("5 minutes")


def test_retry_delay_doubles_and_caps() -> None:
    delays = [retry_delay_seconds(failures, base_seconds=1.0, max_seconds=10.0)
              for failures in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_new_generation_resets_failures() -> None:
    """backoffLimit counts failures of the current spec: a spec change starts from zero."""
    previous = {"observedGeneration": 1, "failures": 5}
    same = starting_status(previous, reason="Syncing", message="", generation=1, now=T0)
    changed = starting_status(previous, reason="Syncing", message="", generation=2, now=T0)
    assert "failures" not in same
    assert changed["failures"] == 0
