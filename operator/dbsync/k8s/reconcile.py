"""One sync of one DatabaseSync: resolve references, run the child, judge, build the status.

Both the kopf change handlers and the scheduler (periodic re-checks, runs started by a
changed Secret or ConfigMap) call :meth:`Reconciler.sync`.  It never writes to the API
itself: it returns the status to write, and the caller writes it through kopf's ``patch``
or through :class:`~dbsync.k8s.kubeclient.KubeClient`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dbsync.k8s import approval, events
from dbsync.k8s.approval import ApprovalAction, ApprovalDecision
from dbsync.k8s.conditions import Reason, now_utc
from dbsync.k8s.credentials import ObjectReader, resolve_inputs
from dbsync.k8s.executor import PLAN_COMMAND, ChildOutcome, SyncExecutor
from dbsync.k8s.job_executor import ActiveJob, JobExecutor, JobOutcome
from dbsync.k8s.models import RUN_AT_ANNOTATION, DatabaseSyncSpec, ExecutorKind, parse_spec
from dbsync.k8s.status import (
    SyncContext,
    Trigger,
    Verdict,
    VerdictKind,
    escalate,
    finished_status,
    judge,
    problem_status,
)
from dbsync.pipeline.errors import ConfigurationError

logger = logging.getLogger("dbsync.k8s.reconcile")

# Triggers of kopf's change handlers, which may reuse a Job adopted after a restart.
_HANDLER_TRIGGERS = frozenset({Trigger.CREATE, Trigger.RESUME, Trigger.UPDATE, Trigger.RETRY})

try:
    from dbsync.k8s import metrics as _metrics
except ImportError:  # the metrics module is optional in stripped-down images
    _metrics = None  # type: ignore[assignment]


@dataclass(frozen=True, kw_only=True)
class SyncOutcome:
    """The status to write and the verdict that decides what happens next."""

    status: dict[str, Any]
    verdict: Verdict
    sync_id: str | None
    failures: int
    # Whether the caller removes the approval annotations, before it writes the status.
    clear_approval_annotations: bool = False


def validation_message(error: ValidationError) -> str:
    """Describe a validation error by location and rule, never by the rejected value."""
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "spec"
        problems.append(f"{location}: {item['msg']}")
    return "; ".join(problems)


def spec_or_verdict(body: Mapping[str, Any]) -> DatabaseSyncSpec | Verdict:
    """Parse the resource's spec, or return the InvalidSpec verdict that explains why not."""
    try:
        return parse_spec(dict(body.get("spec") or {}))
    except ValidationError as error:
        return Verdict(kind=VerdictKind.PERMANENT, reason=Reason.INVALID_SPEC,
                       message=f"invalid spec: {validation_message(error)}")


def run_at_of(body: Mapping[str, Any]) -> str | None:
    """Return the dbsync.io/run-at annotation's value, or None."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(RUN_AT_ANNOTATION)
    return str(value) if value else None


@contextmanager
def _private_directory() -> Iterator[Path]:
    # mkdtemp creates the directory with mode 0700, so only the operator's user reads it.
    directory = Path(tempfile.mkdtemp(prefix="dbsync-sync-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def build_request(spec: DatabaseSyncSpec, *, body: Mapping[str, Any], source_dsn: str,
                  target_dsn: str, audit_dsn: str | None, migrations_dir: Path | None,
                  run_migrations: bool, sync_id: str) -> dict[str, Any]:
    """Return the SyncRequest fields for one sync of ``body``."""
    metadata = body.get("metadata") or {}
    return {
        "source_dsn": source_dsn,
        "target_dsn": target_dsn,
        "migrations_dir": str(migrations_dir) if migrations_dir is not None else None,
        "revision": spec.revision,
        "transaction_mode": spec.transaction_mode.value,
        "dry_run": spec.dry_run.value,
        "run_migrations": run_migrations,
        "lock_wait_seconds": float(spec.lock_wait_seconds),
        "lock_timeout_ms": spec.lock_timeout_ms,
        "statement_timeout_ms": spec.statement_timeout_ms,
        "connect_timeout_seconds": spec.connect_timeout_seconds,
        "diff": {
            "ignore_schemas": list(spec.diff.ignore_schemas),
            "ignore_patterns": list(spec.diff.ignore_patterns),
            "ignore_kinds": list(spec.diff.ignore_kinds),
        },
        "ledger": (spec.ledger.model_dump(mode="json", by_alias=True, exclude_none=True)
                   if spec.ledger is not None else None),
        "audit_dsn": audit_dsn,
        "requester": {
            "kind": "kubernetes",
            "namespace": metadata.get("namespace"),
            "name": metadata.get("name"),
            "uid": metadata.get("uid"),
            "generation": metadata.get("generation"),
        },
        "sync_id": sync_id,
        "approved_plan": None,
    }


@dataclass
class Reconciler:
    """Runs syncs for the operator; one instance per operator process."""

    executor: SyncExecutor
    reader: ObjectReader
    job_executor: JobExecutor | None = None
    default_executor: ExecutorKind = ExecutorKind.PROCESS
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)
    # Per resource uid, the published plan (hash, createdAt) whose approval was acted on.
    _acted_plans: dict[str, tuple[str, str]] = field(default_factory=dict, init=False)

    def lock_for(self, uid: str) -> asyncio.Lock:
        """Return the lock that keeps two syncs of one resource from overlapping."""
        return self._locks.setdefault(uid, asyncio.Lock())

    def forget(self, uid: str) -> None:
        """Drop the lock of a deleted resource."""
        self._locks.pop(uid, None)
        self._acted_plans.pop(uid, None)

    def approval_acted_on(self, uid: str, plan: Mapping[str, Any]) -> bool:
        """Return whether this process already acted on an approval of ``plan``.

        A copy of the resource read before the caller's status write still shows the old
        plan and its approval.  This check keeps such a copy from starting a second run.
        """
        return self._acted_plans.get(uid) == (str(plan.get("hash")),
                                              str(plan.get("createdAt")))

    def _mark_acted(self, body: Mapping[str, Any]) -> None:
        plan = approval.published_plan(body.get("status") or {})
        uid = str((body.get("metadata") or {}).get("uid") or "")
        if plan is not None:
            self._acted_plans[uid] = (str(plan.get("hash")), str(plan.get("createdAt")))

    async def sync(self, body: Mapping[str, Any], *, trigger: Trigger,
                   run_migrations: bool = True) -> SyncOutcome:
        """Run one sync of ``body`` and return the status to write and the verdict."""
        metadata = body.get("metadata") or {}
        uid = str(metadata.get("uid") or f"{metadata.get('namespace')}/{metadata.get('name')}")
        async with self.lock_for(uid):
            return await self._sync(body, trigger=trigger, run_migrations=run_migrations)

    async def _sync(self, body: Mapping[str, Any], *, trigger: Trigger,
                    run_migrations: bool) -> SyncOutcome:
        metadata = body.get("metadata") or {}
        previous = dict(body.get("status") or {})
        generation = metadata.get("generation")
        namespace = str(metadata.get("namespace") or "default")
        run_at = run_at_of(body)
        failures_before = int(previous.get("failures") or 0)

        parsed = spec_or_verdict(body)
        if isinstance(parsed, Verdict):
            return self._problem(body, previous, parsed, generation=generation, run_at=run_at)
        spec = parsed

        # A Job recorded in status is still this resource's sync, whatever the mode now.
        active = ActiveJob.from_status(previous) if self.job_executor is not None else None
        use_job = self.job_executor is not None and (
            active is not None or (spec.executor or self.default_executor) is ExecutorKind.JOB)
        if not use_job and spec.migrations is not None and spec.migrations.image is not None:
            verdict = Verdict(kind=VerdictKind.PERMANENT, reason=Reason.INVALID_SPEC,
                              message="spec.migrations.image needs the job executor: set "
                              "spec.executor to job, or remove migrations.image")
            return self._problem(body, previous, verdict, generation=generation, run_at=run_at)

        sync_id = active.sync_id if active is not None else str(uuid.uuid4())
        started_at = now_utc()
        job_outcome: JobOutcome | None = None
        decision: ApprovalDecision | None = None
        replan: tuple[ChildOutcome, Verdict | None] | None = None
        if use_job and trigger in _HANDLER_TRIGGERS and self.job_executor is not None:
            # After a restart kopf runs the interrupted handler and the resume handler; the
            # Job adopted by the first one is this generation's sync for both.
            job_outcome = self.job_executor.take_adopted(str(metadata.get("uid")), generation)
        if job_outcome is not None:
            sync_id = job_outcome.sync_id
            outcome = job_outcome.outcome

            # An adopted Job started with the approval still in place, so record its use.
            if approval.gate_applies(spec, run_migrations=run_migrations):
                adopted = approval.decide(body, spec, trigger=trigger, now=now_utc())
                if adopted.action is ApprovalAction.APPLY:
                    decision = adopted
        else:
            with _private_directory() as workdir:
                try:
                    inputs = await resolve_inputs(spec, namespace=namespace, reader=self.reader,
                                                  workdir=workdir)
                except ConfigurationError as error:
                    verdict = Verdict(kind=VerdictKind.PERMANENT, reason=error.reason,
                                      message=str(error))
                    return self._problem(body, previous, verdict, generation=generation,
                                         run_at=run_at)

                request = build_request(
                    spec, body=body, source_dsn=inputs.source_dsn,
                    target_dsn=inputs.target_dsn, audit_dsn=inputs.audit_dsn,
                    migrations_dir=inputs.migrations_dir, run_migrations=run_migrations,
                    sync_id=sync_id)

                # With Manual approval nothing runs until the published plan is approved.
                if approval.gate_applies(spec, run_migrations=run_migrations):
                    decision = approval.decide(body, spec, trigger=trigger, now=now_utc())
                    if decision.action is not ApprovalAction.APPLY:
                        return await self._hold(body, spec, request, decision,
                                                secrets=inputs.secrets, run_at=run_at,
                                                use_job=use_job)
                    assert decision.approval is not None
                    self._mark_acted(body)
                    request["approved_plan"] = decision.approval.plan_hash
                    request["approver"] = decision.approval.approver

                events.post_event(
                    body, event_type=events.NORMAL,
                    reason=Reason.RECHECKING if not run_migrations else Reason.SYNCING,
                    message=f"sync {sync_id} started ({trigger.value})")
                logger.info("sync %s of %s/%s started (%s)", sync_id, namespace,
                            metadata.get("name"), trigger.value)
                if use_job and self.job_executor is not None:
                    job_outcome = await self._run_job(body, spec, request, sync_id=sync_id,
                                                      started_at=started_at, trigger=trigger,
                                                      active=active)
                    outcome = job_outcome.outcome
                else:
                    outcome = await self._run_child(request,
                                                    timeout_seconds=spec.sync_timeout_seconds,
                                                    secrets=inputs.secrets)

                # A stale approved plan applied nothing: publish the current one for review.
                if decision is not None and _plan_changed(outcome.report):
                    replan = await self._compute_plan(body, request, spec,
                                                      secrets=inputs.secrets, use_job=use_job)

        verdict = judge(outcome, sync_id=sync_id, fail_on_drift=spec.diff.fail_on_drift,
                        timeout_seconds=spec.sync_timeout_seconds)
        if job_outcome is not None and job_outcome.verdict is not None:
            verdict = job_outcome.verdict
        new_plan: dict[str, Any] | None = None
        if decision is not None and verdict.reason == Reason.PLAN_CHANGED:
            verdict, new_plan = _judge_plan_changed(verdict, replan, spec=spec,
                                                    generation=generation)
        errored = verdict.kind in (VerdictKind.TRANSIENT, VerdictKind.PERMANENT)
        failures = failures_before + 1 if errored else 0
        verdict = escalate(verdict, failures=failures, backoff_limit=spec.backoff_limit)
        context = SyncContext(
            sync_id=sync_id, trigger=trigger, started_at=started_at, finished_at=now_utc(),
            generation=generation, dry_run=spec.dry_run.value, run_migrations=run_migrations,
            fail_on_drift=spec.diff.fail_on_drift, backoff_limit=spec.backoff_limit,
            run_at=run_at if run_migrations else None)
        status = finished_status(previous, report=outcome.report, verdict=verdict,
                                 context=context)
        if use_job:
            # A JSON merge patch removes the field: no Job of this resource runs now.
            status["activeJob"] = None
        consumed = False
        if decision is not None and decision.approval is not None:
            consumed = _record_approval(status, decision.approval, verdict=verdict,
                                        new_plan=new_plan, sync_id=sync_id)
        self._record_metrics(namespace, str(metadata.get("name")), status, outcome.report,
                             verdict)
        events.post_event(body, event_type=verdict.event_type, reason=verdict.reason,
                          message=verdict.message)
        logger.info("sync %s of %s/%s finished: %s (%s)", sync_id, namespace,
                    metadata.get("name"), verdict.kind.value, verdict.reason)
        return SyncOutcome(status=status, verdict=verdict, sync_id=sync_id, failures=failures,
                           clear_approval_annotations=consumed)

    async def _compute_plan(self, body: Mapping[str, Any], request: Mapping[str, Any],
                            spec: DatabaseSyncSpec, *, secrets: tuple[str, ...],
                            use_job: bool) -> tuple[ChildOutcome, Verdict | None]:
        """Run ``dbsync plan`` with the sync's request; it records the plan in the audit trail.

        Computing a plan imports the revision files, so in job mode it runs in a Job like the
        sync, never in the operator's pod.  Returns the outcome and, when the Job ended
        without a message (deadline, failed pod, image pull), the verdict for that.
        """
        plan_request = {**request, "sync_id": str(uuid.uuid4()), "approved_plan": None,
                        "approver": None}
        if use_job and self.job_executor is not None:
            planned = await self.job_executor.plan(body=body, spec=spec, request=plan_request,
                                                   sync_id=plan_request["sync_id"])
            return planned.outcome, planned.verdict

        metadata = body.get("metadata") or {}
        logger.info("computing plan %s of %s/%s in a child process", plan_request["sync_id"],
                    metadata.get("namespace"), metadata.get("name"))
        outcome = await self.executor.run(plan_request,
                                          timeout_seconds=spec.sync_timeout_seconds,
                                          secrets=secrets, command=PLAN_COMMAND)
        return outcome, None

    async def _hold(self, body: Mapping[str, Any], spec: DatabaseSyncSpec,
                    request: Mapping[str, Any], decision: ApprovalDecision, *,
                    secrets: tuple[str, ...], run_at: str | None,
                    use_job: bool) -> SyncOutcome:
        """Keep waiting for approval, or publish a fresh plan and wait for its approval."""
        metadata = body.get("metadata") or {}
        previous = dict(body.get("status") or {})
        generation = metadata.get("generation")
        failures_before = int(previous.get("failures") or 0)
        now = now_utc()
        if decision.action is ApprovalAction.WAIT:
            status = approval.waiting_status(previous, reason=decision.reason,
                                             message=decision.message, generation=generation,
                                             now=now, run_at=run_at)
            if decision.reject_annotation:
                events.post_event(body, event_type=events.WARNING, reason=decision.reason,
                                  message=decision.message)
                logger.warning("approval annotation of %s/%s does not match its plan; removed",
                               metadata.get("namespace"), metadata.get("name"))
            return SyncOutcome(status=status, verdict=Verdict(
                kind=VerdictKind.NOT_READY, reason=decision.reason, message=decision.message),
                sync_id=None, failures=failures_before,
                clear_approval_annotations=decision.reject_annotation)

        if decision.approval is not None:
            self._mark_acted(body)
        outcome, job_verdict = await self._compute_plan(body, request, spec, secrets=secrets,
                                                        use_job=use_job)
        summary = approval.plan_summary(outcome.report)
        if summary is None or outcome.report is None:
            failed = job_verdict or judge(outcome, sync_id=str(request.get("sync_id")),
                                          fail_on_drift=True,
                                          timeout_seconds=spec.sync_timeout_seconds)
            # A plan Job's image that cannot be pulled stalls the resource, as for a sync.
            kind = (VerdictKind.PERMANENT if failed.kind is VerdictKind.PERMANENT
                    and job_verdict is not None else VerdictKind.TRANSIENT)
            verdict = escalate(Verdict(kind=kind, reason=failed.reason,
                                       message=f"computing the plan failed: {failed.message}"),
                               failures=failures_before + 1, backoff_limit=spec.backoff_limit)
            return self._problem(body, previous, verdict, generation=generation, run_at=run_at)

        plan = approval.plan_status(summary, sync_id=str(outcome.report.get("sync_id")),
                                    generation=generation, reason=decision.reason,
                                    max_age=spec.approval.max_age, now=now)
        message = approval.waiting_message(str(metadata.get("name")), plan["hash"], plan)
        if decision.reason != Reason.APPROVAL_PENDING:
            message = f"{decision.message}; new {message}"
        status = approval.waiting_status(previous, reason=decision.reason, message=message,
                                         generation=generation, now=now, plan=plan,
                                         run_at=run_at)
        if decision.approval is not None:
            status["lastApproval"] = approval.approval_record(
                decision.approval, result=decision.reason, sync_id=None, now=now)
        events.post_event(body, event_type=(events.NORMAL
                                            if decision.reason == Reason.APPROVAL_PENDING
                                            else events.WARNING),
                          reason=decision.reason, message=message)
        logger.info("plan %s of %s/%s published (%s)", plan["hash"], metadata.get("namespace"),
                    metadata.get("name"), decision.reason)
        verdict = Verdict(kind=VerdictKind.NOT_READY, reason=decision.reason, message=message)
        return SyncOutcome(status=status, verdict=verdict, sync_id=None, failures=0,
                           clear_approval_annotations=approval.has_approval_annotations(body))

    async def _run_job(self, body: Mapping[str, Any], spec: DatabaseSyncSpec,
                       request: dict[str, Any], *, sync_id: str, started_at: datetime,
                       trigger: Trigger, active: ActiveJob | None) -> JobOutcome:
        assert self.job_executor is not None
        run = self.job_executor.run(body=body, spec=spec, request=request, sync_id=sync_id,
                                    started_at=started_at, trigger=trigger.value, adopt=active)
        if _metrics is None:
            return await run
        with _metrics.track_running():
            return await run

    async def _run_child(self, request: dict[str, Any], *, timeout_seconds: float,
                         secrets: tuple[str, ...]) -> ChildOutcome:
        if _metrics is None:
            return await self.executor.run(request, timeout_seconds=timeout_seconds,
                                           secrets=secrets)
        with _metrics.track_running():
            return await self.executor.run(request, timeout_seconds=timeout_seconds,
                                           secrets=secrets)

    def _problem(self, body: Mapping[str, Any], previous: dict[str, Any], verdict: Verdict, *,
                 generation: int | None, run_at: str | None) -> SyncOutcome:
        """Build the outcome of a sync that could not start."""
        status = problem_status(previous, verdict=verdict, generation=generation, now=now_utc(),
                                run_at=run_at)
        metadata = body.get("metadata") or {}
        logger.warning("sync of %s/%s not started: %s: %s", metadata.get("namespace"),
                       metadata.get("name"), verdict.reason, verdict.message)
        events.post_event(body, event_type=events.WARNING, reason=verdict.reason,
                          message=verdict.message)
        return SyncOutcome(status=status, verdict=verdict, sync_id=None,
                           failures=int(status.get("failures") or 0))

    @staticmethod
    def _record_metrics(namespace: str, name: str, status: Mapping[str, Any],
                        report: Mapping[str, Any] | None, verdict: Verdict) -> None:
        if _metrics is None:
            return
        steps = {str(step.get("name")): int(step.get("duration_ms") or 0) / 1000.0
                 for step in (report or {}).get("steps", [])}
        _metrics.record_sync(namespace=namespace, name=name, step_durations_seconds=steps,
                             result=str(status["lastSync"]["result"]))
        drift = status.get("drift")
        if drift:
            _metrics.set_drift(namespace=namespace, name=name,
                               differences=int(drift["differences"]))
        ledger = status.get("ledger")
        if ledger:
            _metrics.set_ledger_balanced(namespace=namespace, name=name,
                                         balanced=bool(ledger["balanced"]))
        if verdict.kind is VerdictKind.SUCCEEDED:
            _metrics.mark_success(namespace=namespace, name=name)


def _plan_changed(report: Mapping[str, Any] | None) -> bool:
    error = (report or {}).get("error") or {}
    return bool(error.get("reason") == Reason.PLAN_CHANGED)


def _judge_plan_changed(verdict: Verdict,
                        replanned: tuple[ChildOutcome, Verdict | None] | None, *,
                        spec: DatabaseSyncSpec,
                        generation: int | None) -> tuple[Verdict, dict[str, Any] | None]:
    """Turn a PlanChanged failure into a wait for the new plan, or a retry to compute it."""
    replan = replanned[0] if replanned is not None else None
    summary = approval.plan_summary(replan.report if replan is not None else None)
    if replanned is None or replan is None or replan.report is None or summary is None:
        detail = "no plan was computed"
        if replanned is not None and replanned[1] is not None:
            detail = replanned[1].message
        elif replan is not None:
            detail = judge(replan, sync_id="plan", fail_on_drift=True,
                           timeout_seconds=spec.sync_timeout_seconds).message
        return Verdict(kind=VerdictKind.TRANSIENT, reason=Reason.PLAN_CHANGED,
                       message=f"{verdict.message}; computing the new plan failed: {detail}"), None
    plan = approval.plan_status(summary, sync_id=str(replan.report.get("sync_id")),
                                generation=generation, reason=Reason.PLAN_CHANGED,
                                max_age=spec.approval.max_age, now=now_utc())
    message = f"{verdict.message}; new plan {plan['hash']} waits for approval"
    return Verdict(kind=VerdictKind.NOT_READY, reason=Reason.PLAN_CHANGED, message=message), plan


def _record_approval(status: dict[str, Any], used: approval.Approval, *, verdict: Verdict,
                     new_plan: dict[str, Any] | None, sync_id: str) -> bool:
    """Add the approval's outcome to ``status``; return whether the approval is used up.

    A transient failure keeps the approval and the plan, so the retry runs with them.
    """
    if verdict.kind is VerdictKind.TRANSIENT and verdict.reason != Reason.PLAN_CHANGED:
        return False
    if verdict.reason == Reason.PLAN_CHANGED:
        result = Reason.PLAN_CHANGED.value
    elif verdict.kind is VerdictKind.PERMANENT:
        result = "Failed"
    else:
        result = "Applied"
    status["lastApproval"] = approval.approval_record(used, result=result, sync_id=sync_id,
                                                      now=now_utc())
    # A JSON merge patch null removes the plan that was applied or rejected.
    status["plan"] = new_plan
    return True
