"""Run each sync as a Kubernetes Job and read its outcome from the pod's termination message.

The Job's pod runs ``dbsync run`` (or ``dbsync plan``, for a plan waiting for approval)
under its own service account, with no API token, inside the resource limits and deadline
the Job sets.  Before the Job is created its name and sync
id go into ``status.activeJob``, so an operator that restarts while the Job runs finds it
(by the resource uid and sync id labels) and waits for it instead of starting another.
The pod writes a summary of its report to its termination message.  The operator expands it
into the report fields a child process prints, so the status is built the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import quote

from dbsync.k8s.conditions import Reason, format_time
from dbsync.k8s.executor import ChildOutcome
from dbsync.k8s.job_manifest import (
    RESOURCE_UID_LABEL,
    SYNC_CONTAINER,
    SYNC_ID_LABEL,
    JobPurpose,
    JobSettings,
    build_job,
    job_name,
)
from dbsync.k8s.kubeclient import KubeApiError
from dbsync.k8s.models import DatabaseSyncSpec
from dbsync.k8s.status import Verdict, VerdictKind
from dbsync.pipeline.termination import report_from_termination_message

logger = logging.getLogger("dbsync.k8s.jobs")

# Pod waiting reasons that mean the image cannot be pulled, so retrying will not help.
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})

# How long past activeDeadlineSeconds the operator waits for the Job controller to fail the
# Job before it deletes the Job itself (a stopped controller, a pod stuck terminating).
DEADLINE_GRACE_SECONDS = 60.0

# An adopted Job's outcome is reused by the next change-handler sync of the same generation
# within this window.  After a restart kopf runs both the interrupted handler and the resume
# handler, and the adopted Job already is that sync.
ADOPTED_OUTCOME_SECONDS = 120.0


class JobClient(Protocol):
    """The API calls the Job executor makes (implemented by ``KubeClient``)."""

    async def get(self, path: str) -> dict[str, Any] | None: ...

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def delete(self, path: str, *, propagation_policy: str = "Background") -> bool: ...

    async def list_items(self, path: str, *, label_selector: str) -> list[dict[str, Any]]: ...

    async def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def patch_database_sync_status(self, namespace: str, name: str,
                                         status: dict[str, Any]) -> dict[str, Any] | None: ...


@dataclass(frozen=True, kw_only=True)
class JobOutcome:
    """A finished sync Job: the outcome as a child's, and a verdict when the pod left none."""

    outcome: ChildOutcome
    verdict: Verdict | None
    job_name: str
    sync_id: str
    adopted: bool


@dataclass(frozen=True, kw_only=True)
class ActiveJob:
    """``status.activeJob``: the Job of a sync in progress."""

    name: str
    sync_id: str
    started_at: str | None
    trigger: str | None

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ActiveJob | None:
        """Return the active Job recorded in ``status``, or None."""
        active = status.get("activeJob")
        if not isinstance(active, Mapping) or not active.get("name") or not active.get("syncId"):
            return None
        return cls(name=str(active["name"]), sync_id=str(active["syncId"]),
                   started_at=active.get("startedAt"), trigger=active.get("trigger"))


def _jobs_path(namespace: str) -> str:
    return f"/apis/batch/v1/namespaces/{quote(namespace, safe='')}/jobs"


def _pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"


def _condition(job: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == condition_type and condition.get("status") == "True":
            found: Mapping[str, Any] = condition
            return found
    return None


def _container_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == SYNC_CONTAINER:
            found: Mapping[str, Any] = status
            return found
    return {}


def _image_pull_problem(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """Return "<reason>: <message>" when a container of the pods cannot pull its image."""
    for pod in pods:
        pod_status = pod.get("status") or {}
        statuses = [*(pod_status.get("initContainerStatuses") or []),
                    *(pod_status.get("containerStatuses") or [])]
        for status in statuses:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in IMAGE_PULL_REASONS:
                return (f"container {status.get('name')} image {status.get('image')}: "
                        f"{waiting.get('reason')}: {waiting.get('message', '')}").strip()
    return None


@dataclass
class JobExecutor:
    """Creates one Job per sync and waits for it."""

    client: JobClient
    settings: JobSettings = field(default_factory=JobSettings)
    _adopted: dict[str, tuple[int | None, float, JobOutcome]] = field(default_factory=dict,
                                                                       init=False)

    def take_adopted(self, uid: str, generation: int | None) -> JobOutcome | None:
        """Return, once, the outcome of a Job adopted after a restart for this generation."""
        entry = self._adopted.pop(uid, None)
        if entry is None:
            return None
        adopted_generation, finished_monotonic, outcome = entry
        if adopted_generation != generation:
            return None
        if time.monotonic() - finished_monotonic > ADOPTED_OUTCOME_SECONDS:
            return None
        return outcome

    async def revision_keys(self, spec: DatabaseSyncSpec,
                            namespace: str) -> dict[str, list[str]]:
        """Return each migrations ConfigMap's revision keys: ``key`` or every ``*.py`` key."""
        keys: dict[str, list[str]] = {}
        if spec.migrations is None:
            return keys
        for source in spec.migrations.config_maps or ():
            if source.key is not None:
                keys.setdefault(source.name, []).append(source.key)
                continue
            config_map = await self.client.read_config_map(namespace, source.name) or {}
            keys.setdefault(source.name, []).extend(
                sorted(key for key in config_map.get("data") or {} if key.endswith(".py")))
        return keys

    async def run(self, *, body: Mapping[str, Any], spec: DatabaseSyncSpec,
                  request: Mapping[str, Any], sync_id: str, started_at: datetime,
                  trigger: str, adopt: ActiveJob | None = None) -> JobOutcome:
        """Run the sync ``sync_id`` as a Job (or wait for ``adopt``) and return its outcome."""
        metadata = body.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "default")
        resource = str(metadata.get("name"))
        uid = str(metadata.get("uid"))
        name = adopt.name if adopt is not None else job_name(resource, sync_id)
        started = time.monotonic()

        job = await self._find_job(namespace, uid=uid, sync_id=sync_id)
        adopted = job is not None
        if job is None:
            # Recorded first: an operator that dies right after the create finds the Job.
            await self.client.patch_database_sync_status(namespace, resource, {"activeJob": {
                "name": name, "syncId": sync_id, "startedAt": format_time(started_at),
                "trigger": trigger}})
            manifest = build_job(body=body, spec=spec, request=request, sync_id=sync_id,
                                 settings=self.settings,
                                 revision_keys=await self.revision_keys(spec, namespace))
            try:
                await self.client.create(_jobs_path(namespace), manifest)
                logger.info("created Job %s/%s for sync %s", namespace, name, sync_id)
            except KubeApiError as error:
                if error.status != 409:
                    raise
                adopted = True
        else:
            name = str((job.get("metadata") or {}).get("name") or name)
        if adopted:
            logger.info("found Job %s/%s of sync %s; waiting for it instead of starting "
                        "another", namespace, name, sync_id)

        result = await self._wait(namespace, name, sync_id=sync_id,
                                  deadline_seconds=spec.sync_timeout_seconds, started=started)
        outcome = JobOutcome(outcome=result[0], verdict=result[1], job_name=name,
                             sync_id=sync_id, adopted=adopted)
        if adopted:
            self._adopted[uid] = (metadata.get("generation"), time.monotonic(), outcome)
        return outcome

    async def plan(self, *, body: Mapping[str, Any], spec: DatabaseSyncSpec,
                   request: Mapping[str, Any], sync_id: str) -> JobOutcome:
        """Compute the plan ``sync_id`` in a Job running ``dbsync plan`` and return its outcome.

        The outcome's report is what ``dbsync plan --output json`` prints (sync id and
        summary), read from the termination message.  A plan changes nothing, so it is not
        recorded in ``status.activeJob``: after an operator restart the next sync computes
        a new plan, and the old plan Job only runs to its end.
        """
        metadata = body.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "default")
        name = job_name(str(metadata.get("name")), sync_id, JobPurpose.PLAN)
        started = time.monotonic()

        manifest = build_job(body=body, spec=spec, request=request, sync_id=sync_id,
                             settings=self.settings,
                             revision_keys=await self.revision_keys(spec, namespace),
                             purpose=JobPurpose.PLAN)
        await self.client.create(_jobs_path(namespace), manifest)
        logger.info("created Job %s/%s for plan %s", namespace, name, sync_id)

        result = await self._wait(namespace, name, sync_id=sync_id,
                                  deadline_seconds=spec.sync_timeout_seconds, started=started)
        return JobOutcome(outcome=result[0], verdict=result[1], job_name=name,
                          sync_id=sync_id, adopted=False)

    async def _find_job(self, namespace: str, *, uid: str,
                        sync_id: str) -> dict[str, Any] | None:
        selector = f"{RESOURCE_UID_LABEL}={uid},{SYNC_ID_LABEL}={sync_id}"
        jobs = await self.client.list_items(_jobs_path(namespace), label_selector=selector)
        return jobs[0] if jobs else None

    async def _pods(self, namespace: str, sync_id: str) -> list[dict[str, Any]]:
        return await self.client.list_items(_pods_path(namespace),
                                            label_selector=f"{SYNC_ID_LABEL}={sync_id}")

    async def _wait(self, namespace: str, name: str, *, sync_id: str, deadline_seconds: float,
                    started: float) -> tuple[ChildOutcome, Verdict | None]:
        path = f"{_jobs_path(namespace)}/{quote(name, safe='')}"
        while True:
            job = await self.client.get(path)
            elapsed = time.monotonic() - started
            if job is None:
                return self._no_report(elapsed), Verdict(
                    kind=VerdictKind.TRANSIENT, reason=Reason.JOB_DELETED,
                    message=(f"sync {sync_id}: Job {name} was deleted before it finished; "
                             "the next sync closes its open audit operations as ABANDONED"))

            finished = _condition(job, "Complete") or _condition(job, "Failed")
            if finished is not None:
                return await self._finished(namespace, name, job, sync_id=sync_id,
                                            elapsed=elapsed)

            problem = _image_pull_problem(await self._pods(namespace, sync_id))
            if problem is not None:
                await self.client.delete(path)
                return self._no_report(elapsed), Verdict(
                    kind=VerdictKind.PERMANENT, reason=Reason.IMAGE_PULL_FAILED,
                    message=f"sync {sync_id}: Job {name} deleted: {problem}")

            if elapsed > deadline_seconds + DEADLINE_GRACE_SECONDS:
                logger.warning("Job %s/%s outlived its deadline by %.0f s; deleting it",
                               namespace, name, elapsed - deadline_seconds)
                await self.client.delete(path)
                return self._no_report(elapsed), self._deadline_verdict(
                    sync_id, name, deadline_seconds)
            await asyncio.sleep(self.settings.poll_interval_seconds)

    async def _finished(self, namespace: str, name: str, job: Mapping[str, Any], *,
                        sync_id: str, elapsed: float) -> tuple[ChildOutcome, Verdict | None]:
        pods = await self._pods(namespace, sync_id)
        terminated: Mapping[str, Any] = {}
        for pod in pods:
            state = _container_status(pod).get("state") or {}
            if state.get("terminated"):
                terminated = state["terminated"]
        report = report_from_termination_message(terminated.get("message"))
        exit_code = terminated.get("exitCode")
        outcome = ChildOutcome(
            exit_code=int(exit_code) if exit_code is not None else None,
            report=report,
            stderr_tail=(f"pod terminated with reason {terminated.get('reason') or 'unknown'}"
                         if terminated else "no pod status"),
            timed_out=False,
            duration_seconds=elapsed,
        )
        if report is not None:
            return outcome, None

        failed = _condition(job, "Failed")
        if failed is not None and failed.get("reason") == "DeadlineExceeded":
            deadline = float((job.get("spec") or {}).get("activeDeadlineSeconds") or 0)
            return outcome, self._deadline_verdict(sync_id, name, deadline)
        if failed is not None:
            return outcome, Verdict(
                kind=VerdictKind.TRANSIENT, reason=Reason.JOB_FAILED,
                message=(f"sync {sync_id}: Job {name} failed ({failed.get('reason')}: "
                         f"{failed.get('message', '')}) and its pod left no summary "
                         f"(exit code {exit_code}, {outcome.stderr_tail}); see "
                         f"kubectl logs job/{name}"))
        return outcome, None

    @staticmethod
    def _deadline_verdict(sync_id: str, name: str, deadline_seconds: float) -> Verdict:
        return Verdict(
            kind=VerdictKind.TRANSIENT, reason=Reason.DEADLINE_EXCEEDED,
            message=(f"sync {sync_id}: Job {name} ran past activeDeadlineSeconds "
                     f"({deadline_seconds:.0f} s, from spec.syncTimeoutSeconds) and was "
                     "stopped; the next sync closes its open audit operations as ABANDONED"))

    @staticmethod
    def _no_report(elapsed: float) -> ChildOutcome:
        return ChildOutcome(exit_code=None, report=None, stderr_tail="", timed_out=False,
                            duration_seconds=elapsed)
