"""``dbsync demo --operator``: the operator end to end on one machine.

The demo starts the Kubernetes API emulator, a throwaway PostgreSQL with a source and a
target database, and ``dbsync operator`` as a child process with its own kubeconfig.  It
then applies the example manifests with kubectl (or with plain HTTP when kubectl is not
installed) and prints the ``kubectl get dbsyncs`` table each time it changes, until the
resource is Ready.

:class:`OperatorProcess` and :class:`Kubectl` are also what the end-to-end tests and the
operator benchmark use to drive a real operator process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import yaml

# The demo runs from a clone of the repository, where examples/ and crds/ sit beside operator/.
REPOSITORY = Path(__file__).resolve().parents[3]
EXAMPLES_K8S = REPOSITORY / "examples" / "k8s"
CRD_PATH = REPOSITORY / "crds" / "databasesync.yaml"
DEMO_NAMESPACE = "default"
DEMO_RESOURCE = "payments-staging"

# kopf logs "Merge-patching finished with inconsistencies" (1.45) when the API server dropped
# fields of its patch, such as an undeclared status field; the scheduler logs the same phrase.
INCONSISTENT_PATCH_WARNING = "with inconsistencies"


@dataclass
class Kubectl:
    """Runs kubectl against one kubeconfig."""

    kubeconfig: Path
    namespace: str = DEMO_NAMESPACE
    timeout_seconds: float = 60.0

    def run(self, *args: str, input_text: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl ARGS`` in the namespace and return the completed process."""
        command = ["kubectl", f"--kubeconfig={self.kubeconfig}", "-n", self.namespace, *args]
        completed = subprocess.run(command, input=input_text, capture_output=True, text=True,
                                   timeout=self.timeout_seconds, check=False)
        if check and completed.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed with exit code "
                               f"{completed.returncode}: {completed.stderr.strip()}")
        return completed

    def apply(self, path: Path) -> None:
        """Apply the manifest file at ``path``."""
        self.run("apply", "-f", str(path))

    def apply_text(self, manifest: str) -> None:
        """Apply a manifest given as YAML text."""
        self.run("apply", "-f", "-", input_text=manifest)

    def get_json(self, *args: str) -> dict[str, Any]:
        """Return ``kubectl get ARGS -o json`` as a dictionary."""
        loaded: dict[str, Any] = json.loads(self.run("get", *args, "-o", "json").stdout)
        return loaded


@dataclass
class OperatorProcess:
    """``dbsync operator`` as a child process, logging to a file."""

    kubeconfig: Path
    namespaces: Sequence[str] = (DEMO_NAMESPACE,)
    extra_arguments: Sequence[str] = ()
    log_path: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log_file: IO[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        """Start the operator; it logs to :attr:`log_path`."""
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="dbsync-operator-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self._log_file = self.log_path.open("wb")
        command = [sys.executable, "-m", "dbsync.cli.main", "operator"]
        for namespace in self.namespaces:
            command += ["--namespace", namespace]
        command += list(self.extra_arguments)
        environment = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                       "PYTHONUNBUFFERED": "1", **self.environment}
        self.process = subprocess.Popen(command, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=environment)

    @property
    def pid(self) -> int:
        """The operator's process id."""
        if self.process is None:
            raise RuntimeError("the operator process has not been started")
        return self.process.pid

    def log_text(self) -> str:
        """Return everything the operator has logged so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, *, timeout_seconds: float = 20.0) -> None:
        """Stop the operator with SIGINT (kopf's graceful stop), then SIGKILL if needed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_seconds)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_for(predicate: Any, *, timeout_seconds: float, interval_seconds: float = 0.1,
             description: str = "condition") -> Any:
    """Call ``predicate`` until it returns a truthy value; raise TimeoutError after the limit."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_seconds:.0f} s waiting for "
                               f"{description}")
        time.sleep(interval_seconds)


def condition_of(resource: dict[str, Any], condition_type: str) -> dict[str, Any] | None:
    """Return the condition of ``condition_type`` in a resource's status, or None."""
    for condition in (resource.get("status") or {}).get("conditions") or []:
        if condition.get("type") == condition_type:
            return dict(condition)
    return None


def _apply_without_kubectl(server_url: str, manifest: dict[str, Any], namespace: str) -> None:
    """Create one object with a POST, for machines without kubectl."""
    api_version = manifest["apiVersion"]
    kind = manifest["kind"]
    plurals = {"Secret": "secrets", "ConfigMap": "configmaps", "DatabaseSync": "databasesyncs",
               "CustomResourceDefinition": "customresourcedefinitions"}
    prefix = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    if kind == "CustomResourceDefinition":
        path = f"{prefix}/{plurals[kind]}"
    else:
        path = f"{prefix}/namespaces/{namespace}/{plurals[kind]}"
    request = urllib.request.Request(  # noqa: S310 - the emulator's http:// URL
        server_url + path, data=json.dumps(manifest).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):  # noqa: S310 - the local emulator
        pass


def run_operator_demo() -> int:
    """Run the operator demo and return 0 when the example resource became Ready."""
    from dbsync.cli.demo_command import SAMPLE_LEDGER_SQL
    from dbsync.pipeline import logs
    from dbsync.pipeline.request import SyncRequest
    from dbsync.pipeline.runner import run_sync
    from dbsync.testing.kubeapi import running_apiserver
    from dbsync.testing.postgres import LocalPostgres

    # The in-process set-up sync would log every audit event: keep the terminal readable.
    logs.configure(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="dbsync-operator-demo-"))
    kubeconfig = workdir / "kubeconfig"
    have_kubectl = shutil.which("kubectl") is not None
    print("starting PostgreSQL, the Kubernetes API emulator and the operator ...")
    with LocalPostgres() as postgres, running_apiserver(kubeconfig_path=kubeconfig) as api:
        import psycopg

        with psycopg.connect(postgres.dsn("postgres"), autocommit=True) as connection:
            connection.execute("CREATE DATABASE payments_source")
            connection.execute("CREATE DATABASE payments_staging")
        source = postgres.dsn("payments_source")
        target = postgres.dsn("payments_staging")

        # The source plays production: at head, with a balanced ledger.
        run_sync(SyncRequest(source_dsn=source, target_dsn=source,
                             migrations_dir=REPOSITORY / "examples" / "migrations"))
        with psycopg.connect(source, autocommit=True) as connection:
            connection.execute(SAMPLE_LEDGER_SQL)

        secrets = [
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
             "type": "Opaque", "stringData": {"uri": uri}}
            for name, uri in (("payments-source-db", source), ("payments-target-db", target))
        ]
        manifests: list[dict[str, Any]] = [
            yaml.safe_load(CRD_PATH.read_text(encoding="utf-8")),
            *secrets,
            yaml.safe_load((EXAMPLES_K8S / "migrations-configmap.yaml").read_text("utf-8")),
        ]
        kubectl = Kubectl(kubeconfig=kubeconfig)
        for manifest in manifests:
            if have_kubectl:
                kubectl.apply_text(yaml.safe_dump(manifest))
            else:
                _apply_without_kubectl(api.url, manifest, DEMO_NAMESPACE)

        with OperatorProcess(kubeconfig=kubeconfig,
                             log_path=workdir / "operator.log") as operator:
            wait_for(lambda: "Initial authentication has finished" in operator.log_text(),
                     timeout_seconds=60, description="the operator to start")
            print(f"operator running (log: {operator.log_path})")
            resource = EXAMPLES_K8S / "databasesync.yaml"
            print(f"$ kubectl apply -f {resource.relative_to(REPOSITORY)}")
            if have_kubectl:
                kubectl.apply(resource)
            else:
                _apply_without_kubectl(api.url, yaml.safe_load(resource.read_text("utf-8")),
                                       DEMO_NAMESPACE)
            return _watch_until_ready(kubectl if have_kubectl else None, api.url)


def _watch_until_ready(kubectl: Kubectl | None, server_url: str,
                       timeout_seconds: float = 120.0) -> int:
    print("$ kubectl get dbsyncs -o wide   (printed on each change)")
    last_state = ""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if kubectl is not None:
            table = kubectl.run("get", "dbsyncs", "-o", "wide", check=False).stdout
            resource = kubectl.get_json("dbsync", DEMO_RESOURCE)
        else:
            path = (f"/apis/dbsync.io/v1alpha1/namespaces/{DEMO_NAMESPACE}/databasesyncs/"
                    f"{DEMO_RESOURCE}")
            with urllib.request.urlopen(server_url + path, timeout=30) as response:  # noqa: S310
                resource = json.loads(response.read())
            summary = condition_of(resource, "Ready") or {}
            table = (f"{DEMO_RESOURCE}  Ready={summary.get('status')}  "
                     f"{summary.get('reason')}\n")
        # AGE and LAST SYNC change every second: print only when the status changed.
        ready = condition_of(resource, "Ready")
        status = resource.get("status") or {}
        state = json.dumps([ready, status.get("migration"), status.get("drift"),
                            status.get("ledger"), status.get("lastSync", {}).get("syncId")],
                           sort_keys=True, default=str)
        if state != last_state:
            print(table.rstrip())
            last_state = state
        stalled = condition_of(resource, "Stalled")
        if ready is not None and ready.get("status") == "True":
            if kubectl is not None:
                print(kubectl.run("get", "dbsyncs", "-o", "wide").stdout.rstrip())
            print(f"Ready: {ready.get('message')}")
            return 0
        reconciling = condition_of(resource, "Reconciling")
        if ready is not None and reconciling is not None and \
                reconciling.get("status") == "False" and status.get("lastSync"):
            print(f"not Ready ({ready.get('reason')}): {ready.get('message')}")
            return 1
        if stalled is not None and stalled.get("status") == "True":
            print(f"Stalled ({stalled.get('reason')}): {stalled.get('message')}")
            return 1
        time.sleep(0.2)
    print(f"timed out after {timeout_seconds:.0f} s waiting for Ready")
    return 1
