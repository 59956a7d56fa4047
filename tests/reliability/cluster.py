"""An operator under test: the API emulator, kubectl and a `dbsync operator` process.

Unlike the end-to-end suite's module-wide operator, :class:`OperatorCluster` can stop and
start its operator against the same emulator state, sample the operator's memory, and
collect everything the operator and its sync children printed for the secret-leak checks.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import yaml

from dbsync.k8s.demo import (
    CRD_PATH,
    INCONSISTENT_PATCH_WARNING,
    Kubectl,
    OperatorProcess,
    condition_of,
    wait_for,
)
from dbsync.testing.kubeapi import KubeApiServer, running_apiserver
from dbsync.testing.kubeapi.kubelet import enable_kubelet

NAMESPACE = "default"


def sync_manifest(name: str, *, source_secret: str, target_secret: str,
                  **spec: Any) -> dict[str, Any]:
    """Return a DatabaseSync whose source and target are ``uri`` keys of two Secrets."""
    return {
        "apiVersion": "dbsync.io/v1alpha1", "kind": "DatabaseSync",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "source": {"uriFrom": {"secretKeyRef": {"name": source_secret, "key": "uri"}}},
            "target": {"uriFrom": {"secretKeyRef": {"name": target_secret, "key": "uri"}}},
            **spec,
        },
    }


def configmap_of_directory(name: str, directory: Path) -> dict[str, Any]:
    """Return a ConfigMap holding every ``*.py`` file of ``directory``."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
            "data": {path.name: path.read_text("utf-8")
                     for path in sorted(directory.glob("*.py"))}}


@dataclass
class MemorySampler:
    """Samples a process's RSS (without its children) every ``interval_seconds``."""

    pid: int
    interval_seconds: float = 0.2
    peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            process = psutil.Process(self.pid)
            while not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
                self._stop.wait(self.interval_seconds)
        except psutil.Error:
            return

    def stop(self) -> int:
        """Stop sampling and return the peak RSS in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self.peak_bytes


@dataclass
class OperatorCluster:
    """The emulator, kubectl and a restartable operator process."""

    api: KubeApiServer
    kubectl: Kubectl
    workdir: Path
    operator_arguments: tuple[str, ...]
    operator: OperatorProcess | None = None
    starts: int = 0
    # Everything every operator process of this cluster logged, kept across restarts.
    previous_logs: list[str] = field(default_factory=list)

    def start_operator(self) -> OperatorProcess:
        """Start an operator process and wait until it has logged in."""
        self.starts += 1
        operator = OperatorProcess(
            kubeconfig=self.workdir / "kubeconfig", namespaces=(NAMESPACE,),
            log_path=self.workdir / f"operator-{self.starts}.log",
            extra_arguments=self.operator_arguments)
        operator.start()
        self.operator = operator
        wait_for(lambda: "Initial authentication has finished" in operator.log_text(),
                 timeout_seconds=60, description="the operator to log in")
        return operator

    def stop_operator(self, *, timeout_seconds: float = 20.0) -> None:
        """Stop the operator (SIGINT, then SIGKILL) and keep its log."""
        if self.operator is None:
            return
        self.operator.stop(timeout_seconds=timeout_seconds)
        self.previous_logs.append(self.operator.log_text())
        self.operator = None

    def operator_logs(self) -> str:
        """Return the logs of every operator process so far, the running one last."""
        current = self.operator.log_text() if self.operator is not None else ""
        return "\n".join([*self.previous_logs, current])

    def apply(self, *documents: dict[str, Any]) -> None:
        """Apply ``documents`` with kubectl."""
        self.kubectl.apply_text("---\n".join(yaml.safe_dump(document) for document in documents))

    def apply_secret(self, name: str, data: dict[str, str]) -> None:
        self.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                    "type": "Opaque", "stringData": data})

    def get(self, name: str) -> dict[str, Any] | None:
        return self.api.get_object("dbsync.io", "v1alpha1", "databasesyncs", NAMESPACE, name)

    def events(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kubectl.get_json("events")["items"]
        return items

    def wait(self, name: str, predicate: Callable[[dict[str, Any]], bool], *,
             description: str, timeout_seconds: float = 60.0) -> dict[str, Any]:
        """Wait until resource ``name`` satisfies ``predicate``; fail with its status."""
        def check() -> dict[str, Any] | None:
            resource = self.get(name)
            return resource if resource is not None and predicate(resource) else None

        try:
            found: dict[str, Any] = wait_for(check, timeout_seconds=timeout_seconds,
                                             interval_seconds=0.2,
                                             description=f"{name}: {description}")
        except TimeoutError:
            resource = self.get(name) or {}
            raise AssertionError(
                f"{name}: {description} not reached; status: "
                f"{json.dumps(resource.get('status'), indent=1)}\noperator log tail:\n"
                f"{self.operator_logs()[-3000:]}") from None
        return found

    def wait_condition(self, name: str, condition_type: str, status: str,
                       reason: str | None = None, *,
                       timeout_seconds: float = 60.0) -> dict[str, Any]:
        def matches(resource: dict[str, Any]) -> bool:
            condition = condition_of(resource, condition_type) or {}
            return condition.get("status") == status and (
                reason is None or condition.get("reason") == reason)

        return self.wait(name, matches, description=f"{condition_type}={status} {reason or ''}",
                         timeout_seconds=timeout_seconds)

    def assert_no_dropped_status_fields(self) -> None:
        """Fail if kopf saw the API server drop fields of a patch (an undeclared field)."""
        assert INCONSISTENT_PATCH_WARNING not in self.operator_logs()


@contextmanager
def operator_cluster(workdir: Path, *, operator_arguments: tuple[str, ...] = (),
                     start: bool = True, kubelet: bool = False) -> Iterator[OperatorCluster]:
    """Run the emulator with the CRD applied and, when ``start``, an operator process.

    With ``kubelet`` the emulator runs each Job's pod as a local process, logging under
    ``workdir/kubelet`` (for ``--executor job``).
    """
    arguments = ("--retry-base-seconds", "0.5", "--retry-max-seconds", "2", *operator_arguments)
    with running_apiserver(kubeconfig_path=workdir / "kubeconfig") as api:
        runner = enable_kubelet(api, workdir=workdir / "kubelet") if kubelet else None
        kubectl = Kubectl(kubeconfig=workdir / "kubeconfig")
        kubectl.apply(CRD_PATH)
        cluster = OperatorCluster(api=api, kubectl=kubectl, workdir=workdir,
                                  operator_arguments=arguments)
        if start:
            cluster.start_operator()
        try:
            yield cluster
        finally:
            cluster.stop_operator()
            if runner is not None and api.loop is not None:
                asyncio.run_coroutine_threadsafe(runner.close(), api.loop).result(timeout=30)


def ready_reason(resource: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return the Ready condition's status and reason."""
    condition = condition_of(resource, "Ready") or {}
    return condition.get("status"), condition.get("reason")


def elapsed_since(start: float) -> float:
    """Return seconds since the monotonic ``start``, rounded for figures."""
    return round(time.monotonic() - start, 2)
