"""A minimal kubelet and Job controller for the API emulator: Jobs' pods run as local processes.

Opt in with :func:`enable_kubelet`.  When a ``batch/v1`` Job is created, the kubelet creates
its Pod and runs the pod's init containers and its first container one after another as
local processes.  It writes the Pod's and the Job's status as the real controllers do:
phase, ``containerStatuses`` with the exit code and the termination message, the Job's
``active``/``succeeded``/``failed`` counts and its ``Complete`` or ``Failed`` condition.
The failure reason is ``BackoffLimitExceeded``, or ``DeadlineExceeded`` once
``activeDeadlineSeconds`` pass, which also kills the process.  Deleting a Job kills its
process and deletes its pods.

Differences from a node, on purpose:

- Images are not pulled.  A ``dbsync`` command runs the local ``python -m dbsync.cli.main``;
  any other command runs as found on PATH.  An image whose name contains ``does-not-exist``
  leaves the container waiting with ``ErrImagePull``, as an unknown image would.
- Volumes (``emptyDir``, ``configMap``, ``secret`` and ``projected`` ConfigMap/Secret
  sources) become directories under the kubelet's work directory.  Path mapping: every
  ``mountPath`` and the ``terminationMessagePath`` that appear in the container's command,
  arguments and environment values are rewritten to those local paths.  So a local file
  standing for the image's content must not lie under a mounted directory such as ``/tmp``.
- Environment: ``value``, ``valueFrom.secretKeyRef`` and ``valueFrom.configMapKeyRef``; a
  missing Secret or ConfigMap key leaves the container waiting with
  ``CreateContainerConfigError``.  Only PATH is inherited from the test process.
- Security contexts, resource limits, service accounts and ``ttlSecondsAfterFinished`` are
  stored but not enforced, and pods of a Job past its deadline are kept, with their status,
  where the real Job controller deletes them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbsync.testing.kubeapi.crds import now_timestamp
from dbsync.testing.kubeapi.errors import ApiError
from dbsync.testing.kubeapi.server import KubeApiServer
from dbsync.testing.kubeapi.store import EventType, WriteEvent

logger = logging.getLogger("dbsync.testing.kubelet")

# Images whose name contains this fail to pull, to test ErrImagePull handling.
MISSING_IMAGE_MARKER = "does-not-exist"

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# The kubelet keeps at most this much of a termination message file.
MAX_TERMINATION_MESSAGE_BYTES = 4096

# Between SIGTERM and SIGKILL when a deadline passes or a Job is deleted.
STOP_GRACE_SECONDS = 2.0


class ContainerConfigError(Exception):
    """A container's environment or volumes refer to a missing Secret or ConfigMap key."""


@dataclass
class _RunningJob:
    namespace: str
    name: str
    uid: str
    pod_names: list[str] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    deleted: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class Kubelet:
    """Runs the pods of the server's Jobs as local processes; see the module docstring."""

    server: KubeApiServer
    workdir: Path
    python_executable: str = sys.executable
    _jobs: dict[str, _RunningJob] = field(default_factory=dict, init=False)
    _stopping: set[asyncio.Future[None]] = field(default_factory=set, init=False)

    # --- store access (always on the server's loop) --------------------------------------

    def _type(self, group: str, plural: str) -> Any:
        resource_type = self.server.store.find_type(group, "v1", plural)
        if resource_type is None:
            raise RuntimeError(f"the emulator does not serve {plural}")
        return resource_type

    def _get(self, group: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.server.store.get(self._type(group, plural), namespace,
                                                           name)
            return found
        except ApiError:
            return None

    def _write_status(self, group: str, plural: str, namespace: str, name: str,
                      status: dict[str, Any]) -> None:
        current = self._get(group, plural, namespace, name)
        if current is None:
            return
        current["status"] = status
        with contextlib.suppress(ApiError):
            self.server.store.replace(self._type(group, plural), namespace, name, current,
                                      subresource="status")

    # --- events --------------------------------------------------------------------------

    def on_write(self, event: WriteEvent) -> None:
        """Start a created Job's pod; stop a deleted Job's process and delete its pods."""
        if (event.group, event.plural) != ("batch", "jobs"):
            return
        uid = str(event.obj["metadata"].get("uid"))
        if event.type is EventType.ADDED:
            running = _RunningJob(namespace=str(event.namespace), name=event.name, uid=uid)
            self._jobs[uid] = running
            running.task = asyncio.ensure_future(self._run_job(running, event.obj))
        elif event.type is EventType.DELETED and uid in self._jobs:
            running = self._jobs.pop(uid)
            running.deleted = True
            stopping = asyncio.ensure_future(self._stop_deleted(running))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)

    async def _stop_deleted(self, running: _RunningJob) -> None:
        await self._stop(running.process)
        pods = self._type("", "pods")
        for pod_name in running.pod_names:
            with contextlib.suppress(ApiError):
                self.server.store.delete(pods, running.namespace, pod_name, {})

    async def close(self) -> None:
        """Kill every process still running."""
        for running in list(self._jobs.values()):
            running.deleted = True
            await self._stop(running.process)
            if running.task is not None:
                running.task.cancel()
        self._jobs.clear()

    @staticmethod
    async def _stop(process: asyncio.subprocess.Process | None) -> None:
        if process is None or process.returncode is not None:
            return
        for stop_signal in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, stop_signal)
            try:
                await asyncio.wait_for(process.wait(), timeout=STOP_GRACE_SECONDS)
                return
            except TimeoutError:
                continue

    # --- one Job -------------------------------------------------------------------------

    async def _run_job(self, running: _RunningJob, job: dict[str, Any]) -> None:
        try:
            await self._run_job_pod(running, job)
        except Exception:
            logger.exception("kubelet failed to run Job %s/%s", running.namespace, running.name)

    async def _run_job_pod(self, running: _RunningJob, job: dict[str, Any]) -> None:
        namespace, job_name = running.namespace, running.name
        started = time.monotonic()
        job_status: dict[str, Any] = {"active": 1, "ready": 0, "startTime": now_timestamp()}
        self._write_status("batch", "jobs", namespace, job_name, job_status)

        template = (job.get("spec") or {}).get("template") or {}
        pod_spec = dict(template.get("spec") or {})
        pod_name = f"{job_name}-{uuid.uuid4().hex[:5]}"
        labels = {**((template.get("metadata") or {}).get("labels") or {}),
                  "batch.kubernetes.io/job-name": job_name, "job-name": job_name,
                  "batch.kubernetes.io/controller-uid": running.uid,
                  "controller-uid": running.uid}
        self.server.store.create(self._type("", "pods"), namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                              "name": job_name, "uid": running.uid,
                                              "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": pod_spec,
        })
        running.pod_names.append(pod_name)
        pod_status: dict[str, Any] = {"phase": "Pending", "startTime": now_timestamp()}
        self._write_status("", "pods", namespace, pod_name, pod_status)

        deadline_value = (job.get("spec") or {}).get("activeDeadlineSeconds")
        deadline = started + float(deadline_value) if deadline_value else None
        containers = [*(pod_spec.get("initContainers") or []), *pod_spec.get("containers", [])]
        pod_dir = self.workdir / namespace / pod_name

        result: dict[str, Any] | None = None
        for index, container in enumerate(containers):
            is_init = index < len(pod_spec.get("initContainers") or [])
            key = "initContainerStatuses" if is_init else "containerStatuses"
            name = str(container.get("name"))
            image = str(container.get("image"))

            if MISSING_IMAGE_MARKER in image:
                pod_status[key] = [_waiting(name, image, "ErrImagePull",
                                            f'failed to pull image "{image}": not found')]
                self._write_status("", "pods", namespace, pod_name, pod_status)
                await self._wait_for_deadline(running, deadline)
                break

            try:
                command, environment, message_file = self._prepare(
                    namespace, pod_spec, container, pod_dir)
            except ContainerConfigError as error:
                pod_status[key] = [_waiting(name, image, "CreateContainerConfigError",
                                            str(error))]
                self._write_status("", "pods", namespace, pod_name, pod_status)
                await self._wait_for_deadline(running, deadline)
                break

            pod_status.update(phase="Running" if not is_init else "Pending")
            pod_status[key] = [{"name": name, "image": image, "ready": not is_init,
                                "restartCount": 0,
                                "state": {"running": {"startedAt": now_timestamp()}}}]
            self._write_status("", "pods", namespace, pod_name, pod_status)

            result = await self._run_container(running, command, environment, pod_dir / name,
                                               deadline)
            if running.deleted:
                return
            message = ""
            if message_file.exists():
                message = message_file.read_bytes()[:MAX_TERMINATION_MESSAGE_BYTES].decode(
                    "utf-8", errors="replace")
            exit_code = int(result["exit_code"])
            terminated = {"exitCode": exit_code,
                          "reason": "Completed" if exit_code == 0 else "Error",
                          "startedAt": pod_status[key][0]["state"]["running"]["startedAt"],
                          "finishedAt": now_timestamp()}
            if message:
                terminated["message"] = message
            pod_status[key] = [{"name": name, "image": image, "ready": False,
                                "restartCount": 0, "state": {"terminated": terminated}}]
            if result["deadline_exceeded"] or exit_code != 0:
                break

        if running.deleted:
            return
        deadline_exceeded = deadline is not None and time.monotonic() >= deadline
        succeeded = (result is not None and not result["deadline_exceeded"]
                     and int(result["exit_code"]) == 0 and not deadline_exceeded)
        pod_status["phase"] = "Succeeded" if succeeded else "Failed"
        self._write_status("", "pods", namespace, pod_name, pod_status)

        now = now_timestamp()
        job_status.update(active=0, ready=0)
        if succeeded:
            job_status.update(succeeded=1, completionTime=now, conditions=[
                _condition("SuccessCriteriaMet", "CompletionsReached",
                           "Reached expected number of succeeded pods", now),
                _condition("Complete", "CompletionsReached",
                           "Reached expected number of succeeded pods", now)])
        elif deadline_exceeded or (result is not None and result["deadline_exceeded"]):
            job_status.update(failed=1, conditions=[
                _condition("FailureTarget", "DeadlineExceeded",
                           "Job was active longer than specified deadline", now),
                _condition("Failed", "DeadlineExceeded",
                           "Job was active longer than specified deadline", now)])
        else:
            job_status.update(failed=1, conditions=[
                _condition("FailureTarget", "BackoffLimitExceeded",
                           "Job has reached the specified backoff limit", now),
                _condition("Failed", "BackoffLimitExceeded",
                           "Job has reached the specified backoff limit", now)])
        self._write_status("batch", "jobs", namespace, job_name, job_status)
        self._jobs.pop(running.uid, None)

    async def _wait_for_deadline(self, running: _RunningJob, deadline: float | None) -> None:
        """Wait, as a stuck container does, until the deadline or the Job's deletion."""
        while not running.deleted and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.2)

    async def _run_container(self, running: _RunningJob, command: list[str],
                             environment: dict[str, str], log_dir: Path,
                             deadline: float | None) -> dict[str, Any]:
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / "output.log").open("wb") as log:
            # A new session lets a deadline or a deletion kill everything the container started.
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env=environment, cwd=str(log_dir), start_new_session=True)
            running.process = process
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            deadline_exceeded = False
            try:
                await asyncio.wait_for(process.wait(), timeout=timeout)
            except TimeoutError:
                deadline_exceeded = True
                await self._stop(process)
        return {"exit_code": process.returncode if process.returncode is not None else 137,
                "deadline_exceeded": deadline_exceeded}

    # --- container set-up ----------------------------------------------------------------

    def _prepare(self, namespace: str, pod_spec: Mapping[str, Any],
                 container: Mapping[str, Any],
                 pod_dir: Path) -> tuple[list[str], dict[str, str], Path]:
        """Return the command, environment and local termination message file of a container."""
        name = str(container.get("name"))
        container_dir = pod_dir / name
        container_dir.mkdir(parents=True, exist_ok=True)
        volumes = {str(volume.get("name")): volume for volume in pod_spec.get("volumes") or []}

        mapping: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            volume_name = str(mount.get("name"))
            local = pod_dir / "volumes" / volume_name
            if not local.exists():
                self._fill_volume(namespace, volumes.get(volume_name) or {}, local)
            mapping[str(mount["mountPath"]).rstrip("/")] = str(local)

        message_path = str(container.get("terminationMessagePath")
                           or DEFAULT_TERMINATION_MESSAGE_PATH)
        message_file = container_dir / "termination-log"
        message_file.unlink(missing_ok=True)
        mapping[message_path] = str(message_file)

        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for variable in container.get("env") or []:
            value = self._env_value(namespace, variable)
            if value is not None:
                environment[str(variable["name"])] = _rewrite(value, mapping)

        command = [_rewrite(str(part), mapping) for part in container.get("command") or []]
        arguments = [_rewrite(str(part), mapping) for part in container.get("args") or []]
        if command[:1] == ["dbsync"]:
            # The local dbsync replaces the image's entry point.
            command = [self.python_executable, "-m", "dbsync.cli.main", *command[1:]]
        if not command:
            raise ContainerConfigError(f"container {name} has no command; the emulator's "
                                       "kubelet knows no image entry points")
        return [*command, *arguments], environment, message_file

    def _env_value(self, namespace: str, variable: Mapping[str, Any]) -> str | None:
        if "value" in variable:
            return str(variable["value"])
        source = variable.get("valueFrom") or {}
        if "secretKeyRef" in source:
            reference = source["secretKeyRef"]
            return self._data_value(namespace, "secrets", reference["name"], reference["key"],
                                    encoded=True, optional=bool(reference.get("optional")))
        if "configMapKeyRef" in source:
            reference = source["configMapKeyRef"]
            return self._data_value(namespace, "configmaps", reference["name"],
                                    reference["key"], encoded=False,
                                    optional=bool(reference.get("optional")))
        return None

    def _data_value(self, namespace: str, plural: str, name: str, key: str, *, encoded: bool,
                    optional: bool) -> str | None:
        found = self._get("", plural, namespace, name)
        data = (found or {}).get("data") or {}
        if key not in data:
            if optional:
                return None
            kind = "secret" if plural == "secrets" else "configmap"
            raise ContainerConfigError(f'couldn\'t find key {key} in {kind} {namespace}/{name}')
        value = str(data[key])
        return base64.b64decode(value).decode("utf-8") if encoded else value

    def _fill_volume(self, namespace: str, volume: Mapping[str, Any], local: Path) -> None:
        local.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            self._project(namespace, "configmaps", volume["configMap"], local, name_key="name")
        elif "secret" in volume:
            self._project(namespace, "secrets", volume["secret"], local, name_key="secretName")
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                if "configMap" in source:
                    self._project(namespace, "configmaps", source["configMap"], local,
                                  name_key="name")
                elif "secret" in source:
                    self._project(namespace, "secrets", source["secret"], local,
                                  name_key="name")
        elif "emptyDir" not in volume:
            shutil.rmtree(local, ignore_errors=True)
            raise ContainerConfigError(f"volume {volume.get('name')} has a type the emulator's "
                                       "kubelet does not support")

    def _project(self, namespace: str, plural: str, source: Mapping[str, Any], local: Path, *,
                 name_key: str) -> None:
        name = str(source.get(name_key))
        found = self._get("", plural, namespace, name)
        if found is None:
            raise ContainerConfigError(f"{plural[:-1]} {namespace}/{name} not found")
        data = found.get("data") or {}
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            if item["key"] not in data:
                raise ContainerConfigError(f"couldn't find key {item['key']} in "
                                           f"{plural[:-1]} {namespace}/{name}")
            value = str(data[item["key"]])
            content = base64.b64decode(value) if plural == "secrets" else value.encode("utf-8")
            target = local / str(item["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)


def _rewrite(text: str, mapping: Mapping[str, str]) -> str:
    """Replace each container path in ``text`` by its local path, in one pass.

    One pass, because local paths may themselves start with a container path such as /tmp.
    """
    if not mapping:
        return text
    alternatives = "|".join(re.escape(path) for path in sorted(mapping, key=len, reverse=True))
    pattern = re.compile(f"(?:{alternatives})" + r"(?![\w.-])")
    return pattern.sub(lambda match: mapping[match.group(0)], text)


def _waiting(name: str, image: str, reason: str, message: str) -> dict[str, Any]:
    return {"name": name, "image": image, "ready": False, "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}}}


def _condition(condition_type: str, reason: str, message: str, now: str) -> dict[str, Any]:
    return {"type": condition_type, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


def enable_kubelet(server: KubeApiServer, *, workdir: Path) -> Kubelet:
    """Attach a :class:`Kubelet` to ``server``; pods' files and logs go under ``workdir``.

    Call it before Jobs are created.  Each container's output is kept in
    ``workdir/<namespace>/<pod>/<container>/output.log``.
    """
    kubelet = Kubelet(server=server, workdir=workdir)
    server.add_write_listener(kubelet.on_write)
    return kubelet
