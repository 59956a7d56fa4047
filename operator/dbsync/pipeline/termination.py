"""A sync report cut down to a Kubernetes termination message, and expanded back.

A sync Job's pod writes this summary to its termination message file, and the kubelet copies
it into ``status.containerStatuses[].state.terminated.message``, where the operator reads it.
The kubelet keeps at most 4096 bytes of that file, so the summary carries counts, names,
revisions and ids only.  The audit trail, found by the sync id, contains the full detail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The pod writes its summary here; the Job manifest and the emulator's kubelet set it.
TERMINATION_MESSAGE_PATH_VARIABLE = "DBSYNC_TERMINATION_MESSAGE_PATH"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# Kubernetes truncates a container's termination message to 4096 bytes.
MAX_TERMINATION_MESSAGE_BYTES = 4096

SUMMARY_VERSION = 1

# Criteria the operator's status reads even when they pass.
_ALWAYS_KEPT_CRITERIA = frozenset({"every_step_audited"})

# Lengths that free text is cut to when a summary does not fit, tried in this order.
_TEXT_LIMITS = (1000, 300, 100)


def _cut(text: Any, limit: int) -> str:
    value = str(text or "")
    return value if len(value) <= limit else value[:limit - 3] + "..."


def _summary(report: Mapping[str, Any], *, text_limit: int, with_details: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "version": SUMMARY_VERSION,
        "sync_id": report.get("sync_id"),
        "result": report.get("result"),
        "exit_code": report.get("exit_code"),
        "dry_run": report.get("dry_run"),
        "steps": [
            {"name": step.get("name"), "result": step.get("result"),
             "duration_ms": step.get("duration_ms"),
             **({"operation_id": step.get("operation_id")} if with_details else {})}
            for step in report.get("steps") or []
        ],
        "criteria": [
            {"name": criterion.get("name"), "ok": criterion.get("ok"),
             "counted": criterion.get("counted", True),
             "detail": _cut(criterion.get("detail"), text_limit)}
            for criterion in report.get("criteria") or []
            if not criterion.get("ok") or criterion.get("name") in _ALWAYS_KEPT_CRITERIA
        ],
    }

    migration = report.get("migration")
    if migration:
        applied = [str(revision) for revision in migration.get("applied") or []]
        summary["migration"] = {
            "revision_before": migration.get("revision_before"),
            "revision_after": migration.get("revision_after"),
            "target_revision": migration.get("target_revision"),
            "applied_count": len(applied),
            "pending_count": len(migration.get("outcomes") or []),
        }
        if with_details:
            summary["migration"]["applied"] = applied

    drift = report.get("drift")
    if drift is not None:
        kinds: dict[str, int] = {}
        for difference in drift.get("differences") or []:
            kind = str(difference.get("kind", "unknown"))
            kinds[kind] = kinds.get(kind, 0) + 1
        summary["drift"] = {"differences": sum(kinds.values()),
                            "by_kind": dict(sorted(kinds.items())) if with_details else {}}

    ledger = report.get("ledger")
    if ledger is not None:
        failed = ledger.get("failed_checks")
        if failed is None:
            failed = [check.get("name") for check in ledger.get("checks") or []
                      if str(check.get("status", "")).upper() not in ("PASS", "PASSED",
                                                                        "SKIPPED")]
        summary["ledger"] = {"balanced": bool(ledger.get("balanced")),
                             "failed_checks": [_cut(name, 100) for name in failed]}

    error = report.get("error")
    if error:
        summary["error"] = {"reason": error.get("reason"),
                            "message": _cut(error.get("message"), text_limit),
                            "transient": bool(error.get("transient"))}
    return summary


def termination_message(report: Mapping[str, Any]) -> str:
    """Return the JSON summary of ``report`` (a SyncReport's dict), at most 4096 bytes.

    Free text is cut shorter, then per-step operation ids, applied revision ids and drift
    counts by kind are dropped, until the summary fits.
    """
    for with_details in (True, False):
        for text_limit in _TEXT_LIMITS:
            text = json.dumps(_summary(report, text_limit=text_limit, with_details=with_details),
                              separators=(",", ":"))
            if len(text.encode("utf-8")) <= MAX_TERMINATION_MESSAGE_BYTES:
                return text

    # Only a pathological report (thousands of failed ledger checks) gets here.
    minimal: dict[str, Any] = {"version": SUMMARY_VERSION, "sync_id": report.get("sync_id"),
                               "result": report.get("result"),
                               "exit_code": report.get("exit_code"),
                               "dry_run": report.get("dry_run"), "truncated": True}
    error = report.get("error")
    if error:
        minimal["error"] = {"reason": error.get("reason"),
                            "message": _cut(error.get("message"), 300),
                            "transient": bool(error.get("transient"))}
    return json.dumps(minimal, separators=(",", ":"))


def _trimmed(items: list[Any], limit: int | None) -> list[str]:
    """Return ``items`` as text, keeping ``limit`` of them and a count of the rest."""
    texts = [str(item) for item in items]
    if limit is None or len(texts) <= limit:
        return texts
    return [*texts[:limit], f"... and {len(texts) - limit} more"]


def plan_termination_message(*, sync_id: str, summary: Mapping[str, Any]) -> str:
    """Return the JSON message of a plan Job: the plan's summary, at most 4096 bytes.

    ``summary`` is ``SyncPlan.summary()``.  When it does not fit, the revision, ledger check
    and non-transactional lists keep their first entries and end with an
    ``"... and N more"`` entry.  The hash always covers the whole plan, and the PLAN audit
    operation of ``sync_id`` contains every entry.
    """
    list_keys = ("revisions", "non_transactional", "ledger_checks")
    for limit in (None, 100, 40, 10, 0):
        trimmed = {key: (_trimmed(list(value or []), limit) if key in list_keys else value)
                   for key, value in summary.items()}
        text = json.dumps({"version": SUMMARY_VERSION, "kind": "plan", "sync_id": sync_id,
                           "result": "Planned", "exit_code": 0, "plan": trimmed},
                          separators=(",", ":"), default=str)
        if len(text.encode("utf-8")) <= MAX_TERMINATION_MESSAGE_BYTES:
            return text

    # Only revision ids thousands of characters long get here; the operator then retries.
    raise ValueError(f"the summary of plan {summary.get('hash')} does not fit in "
                     f"{MAX_TERMINATION_MESSAGE_BYTES} bytes even without its lists")


def _write(text: str, environ: Mapping[str, str]) -> Path | None:
    location = environ.get(TERMINATION_MESSAGE_PATH_VARIABLE)
    if not location:
        return None
    path = Path(location)
    path.write_text(text, encoding="utf-8")
    return path


def write_termination_message(report: Mapping[str, Any],
                              environ: Mapping[str, str] = os.environ) -> Path | None:
    """Write the summary to ``$DBSYNC_TERMINATION_MESSAGE_PATH``; return the path, or None.

    Nothing is written when the variable is unset, so CLI runs outside a pod are unaffected.
    """
    if not environ.get(TERMINATION_MESSAGE_PATH_VARIABLE):
        return None
    return _write(termination_message(report), environ)


def write_plan_termination_message(*, sync_id: str, summary: Mapping[str, Any],
                                   environ: Mapping[str, str] = os.environ) -> Path | None:
    """Write a plan's message to ``$DBSYNC_TERMINATION_MESSAGE_PATH``, as for a sync."""
    if not environ.get(TERMINATION_MESSAGE_PATH_VARIABLE):
        return None
    return _write(plan_termination_message(sync_id=sync_id, summary=summary), environ)


def report_from_termination_message(text: str | None) -> dict[str, Any] | None:
    """Expand a summary into the report fields the operator's status code reads.

    Returns None when ``text`` is empty or not a summary (a crash message, for example).
    Lists the summary only counts (applied revisions without ids, pending revisions, schema
    differences) are rebuilt as placeholders of the right length.
    """
    if not text:
        return None
    try:
        summary = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(summary, dict) or summary.get("version") != SUMMARY_VERSION:
        return None

    # A plan Job's message expands to what ``dbsync plan --output json`` prints.
    if summary.get("kind") == "plan" and isinstance(summary.get("plan"), dict):
        return {"sync_id": summary.get("sync_id"), "result": summary.get("result"),
                "exit_code": summary.get("exit_code"), "summary": summary["plan"]}

    report: dict[str, Any] = {
        "sync_id": summary.get("sync_id"),
        "result": summary.get("result"),
        "exit_code": summary.get("exit_code"),
        "dry_run": summary.get("dry_run"),
        "steps": [{"name": step.get("name"), "result": step.get("result"),
                   "duration_ms": step.get("duration_ms"),
                   "operation_id": step.get("operation_id")}
                  for step in summary.get("steps") or []],
        "criteria": list(summary.get("criteria") or []),
        "migration": None,
        "drift": None,
        "ledger": None,
        "error": summary.get("error"),
    }

    migration = summary.get("migration")
    if migration:
        applied = migration.get("applied")
        if applied is None:
            applied = ["?"] * int(migration.get("applied_count") or 0)
        report["migration"] = {
            "revision_before": migration.get("revision_before"),
            "revision_after": migration.get("revision_after"),
            "target_revision": migration.get("target_revision"),
            "applied": applied,
            "outcomes": [{}] * int(migration.get("pending_count") or 0),
        }

    drift = summary.get("drift")
    if drift is not None:
        differences: list[dict[str, str]] = []
        for kind, count in (drift.get("by_kind") or {}).items():
            differences.extend({"kind": kind} for _ in range(int(count)))
        unknown = int(drift.get("differences") or 0) - len(differences)
        differences.extend({"kind": "unknown"} for _ in range(max(0, unknown)))
        report["drift"] = {"differences": differences}

    ledger = summary.get("ledger")
    if ledger is not None:
        report["ledger"] = {"balanced": bool(ledger.get("balanced")),
                            "failed_checks": list(ledger.get("failed_checks") or [])}
    return report
