"""Operator benchmark: create-to-Ready latency, memory with 100 resources, one large sync.

Runs ``dbsync operator`` as a real process against the Kubernetes API emulator and a
throwaway PostgreSQL, and prints each figure next to a baseline measured in the same run:

1. create-to-Ready latency of a no-op sync (goal: p50 at most 1 s), against the same sync
   run directly as ``dbsync run --request -`` (the child process the operator starts);
2. the operator's peak RSS (psutil, the operator process without its children) while 100
   resources are created and synced (goal: at most 150 MB), against its idle RSS;
3. one whole sync through the operator of 500 tables in 20 revisions with 1,000,000
   postings (goal: at most 15 s), against the same sync run directly.

Usage: ``python bench/bench_operator.py [--resources 100] [--latency-samples 10]
[--postings 1000000] [--skip-large]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import psycopg
import yaml

from dbsync.k8s.demo import CRD_PATH, OperatorProcess, condition_of
from dbsync.testing.kubeapi import KubeApiServer, running_apiserver
from dbsync.testing.postgres import LocalPostgres

NAMESPACE = "default"
RESOURCES_PATH = f"/apis/dbsync.io/v1alpha1/namespaces/{NAMESPACE}/databasesyncs"
SECRETS_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets"
CONFIGMAPS_PATH = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
LATENCY_GOAL_SECONDS = 1.0
MEMORY_GOAL_MB = 150.0
LARGE_SYNC_GOAL_SECONDS = 15.0


def post(server: KubeApiServer, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
        pass


def create_database(postgres: LocalPostgres, name: str) -> str:
    with psycopg.connect(postgres.dsn("postgres"), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return postgres.dsn(name)


def secret(name: str, uri: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "type": "Opaque", "stringData": {"uri": uri}}


def database_sync(name: str, spec_changes: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "source": {"uriFrom": {"secretKeyRef": {"name": "bench-source", "key": "uri"}}},
        "target": {"uriFrom": {"secretKeyRef": {"name": "bench-target", "key": "uri"}}},
    }
    spec.update(spec_changes or {})
    return {"apiVersion": "dbsync.io/v1alpha1", "kind": "DatabaseSync",
            "metadata": {"name": name}, "spec": spec}


def is_ready(server: KubeApiServer, name: str) -> bool:
    resource = server.get_object("dbsync.io", "v1alpha1", "databasesyncs", NAMESPACE, name)
    if resource is None:
        return False
    ready = condition_of(resource, "Ready") or {}
    stalled = condition_of(resource, "Stalled") or {}
    if stalled.get("status") == "True":
        raise RuntimeError(f"{name} is Stalled: {stalled.get('message')}")
    return ready.get("status") == "True"


def wait_ready(server: KubeApiServer, names: list[str], *, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    pending = list(names)
    while pending:
        pending = [name for name in pending if not is_ready(server, name)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} resources not Ready after {timeout_seconds} s")
        time.sleep(0.02)


def run_direct(request: dict[str, Any]) -> float:
    """Run one sync as the operator's child would and return its wall-clock seconds."""
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "dbsync.cli.main", "run", "--request", "-", "--output", "json"],
        input=json.dumps(request), capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"direct sync failed: {completed.stdout[-2000:]}")
    return elapsed


class RssSampler:
    """Samples one process's RSS every 50 ms in a thread and keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def large_revisions(directory: Path, *, revisions: int, tables: int, postings: int) -> None:
    """Write ``revisions`` revision files creating ``tables`` tables and the postings."""
    directory.mkdir(parents=True, exist_ok=True)
    per_revision = (tables - 1) // (revisions - 1)
    previous = None
    for number in range(1, revisions + 1):
        revision = f"r{number:03d}"
        if number == 1:
            body = (
                '    op.execute("CREATE TABLE postings (id bigint GENERATED ALWAYS AS IDENTITY '
                'PRIMARY KEY, transaction_id bigint NOT NULL, amount numeric(18,2) NOT NULL, '
                'side char(1) NOT NULL)")\n'
                f'    op.execute("INSERT INTO postings (transaction_id, amount, side) '
                f"SELECT g / 2, 10.00, CASE WHEN g % 2 = 0 THEN 'D' ELSE 'C' END "
                f'FROM generate_series(0, {postings - 1}) AS g")\n'
                '    op.execute("CREATE INDEX postings_transaction ON postings '
                '(transaction_id) INCLUDE (side, amount)")\n')
        else:
            first = 1 + (number - 2) * per_revision
            last = tables - 1 if number == revisions else first + per_revision - 1
            body = "".join(
                f"    op.execute('CREATE TABLE t{index:04d} (id bigint PRIMARY KEY, "
                f"name text NOT NULL, amount numeric(12,2), created_at timestamptz "
                f"DEFAULT now())')\n"
                for index in range(first, last + 1))
        (directory / f"{revision}.py").write_text(
            f'"""Benchmark revision {number}."""\n\n'
            "from alembic import op\n\n"
            f"revision = {revision!r}\n"
            f"down_revision = {previous!r}\n"
            "branch_labels = None\n"
            "depends_on = None\n\n\n"
            "def upgrade() -> None:\n"
            f"{body}\n\n"
            "def downgrade() -> None:\n"
            "    pass\n")
        previous = revision


LEDGER = {
    "postings": {"table": "public.postings", "style": "side", "transactionId": "transaction_id",
                 "amount": "amount", "side": "side", "debitValue": "D", "creditValue": "C",
                 "fixedCurrency": "EUR"},
    "checks": ["transaction_balance", "minimum_legs", "trial_balance", "field_sanity"],
}


def bench_latency(server: KubeApiServer, *, samples: int, source: str, target: str) -> None:
    direct = [run_direct({"source_dsn": source, "target_dsn": target}) for _ in range(3)]
    latencies = []
    for index in range(samples):
        name = f"latency-{index}"
        started = time.monotonic()
        post(server, RESOURCES_PATH, database_sync(name))
        wait_ready(server, [name], timeout_seconds=120)
        latencies.append(time.monotonic() - started)
    p50 = statistics.median(latencies)
    baseline = statistics.median(direct)
    print(f"create-to-Ready, no-op sync ({samples} samples): p50 {p50:.2f} s, "
          f"max {max(latencies):.2f} s (goal p50 <= {LATENCY_GOAL_SECONDS:.0f} s)")
    print(f"  baseline: direct `dbsync run` p50 {baseline:.2f} s; ratio {p50 / baseline:.2f}")


def bench_memory(server: KubeApiServer, operator: OperatorProcess, *, resources: int) -> None:
    idle_rss = psutil.Process(operator.pid).memory_info().rss
    names = [f"fleet-{index:03d}" for index in range(resources)]
    started = time.monotonic()
    with RssSampler(operator.pid) as sampler:
        for name in names:
            post(server, RESOURCES_PATH, database_sync(name))
        wait_ready(server, names, timeout_seconds=60 + 5 * resources)
    elapsed = time.monotonic() - started
    peak_mb = sampler.peak_bytes / 1e6
    print(f"{resources} resources synced in {elapsed:.1f} s; operator peak RSS {peak_mb:.0f} MB "
          f"(goal <= {MEMORY_GOAL_MB:.0f} MB)")
    print(f"  baseline: idle operator RSS {idle_rss / 1e6:.0f} MB; ratio "
          f"{sampler.peak_bytes / idle_rss:.2f}")


def bench_large(server: KubeApiServer, postgres: LocalPostgres, workdir: Path, *,
                postings: int) -> None:
    migrations = workdir / "large-migrations"
    large_revisions(migrations, revisions=20, tables=500, postings=postings)
    source = create_database(postgres, "large_source")
    direct_target = create_database(postgres, "large_direct")
    operator_target = create_database(postgres, "large_operator")
    run_direct({"source_dsn": source, "target_dsn": source, "migrations_dir": str(migrations)})

    baseline = run_direct({"source_dsn": source, "target_dsn": direct_target,
                           "migrations_dir": str(migrations), "ledger": LEDGER})

    post(server, SECRETS_PATH, secret("large-source", source))
    post(server, SECRETS_PATH, secret("large-target", operator_target))
    resource = database_sync("large", {
        "source": {"uriFrom": {"secretKeyRef": {"name": "large-source", "key": "uri"}}},
        "target": {"uriFrom": {"secretKeyRef": {"name": "large-target", "key": "uri"}}},
        "migrations": {"path": str(migrations)}, "ledger": LEDGER,
        "syncTimeoutSeconds": 600})
    started = time.monotonic()
    post(server, RESOURCES_PATH, resource)
    wait_ready(server, ["large"], timeout_seconds=600)
    elapsed = time.monotonic() - started
    status = (server.get_object("dbsync.io", "v1alpha1", "databasesyncs", NAMESPACE, "large")
              or {}).get("status", {})
    steps = ", ".join(f"{step['name']} {step['durationMs'] / 1000:.1f} s"
                      for step in status["lastSync"]["steps"])
    print(f"large sync (500 tables, 20 revisions, {postings:,} postings) through the operator: "
          f"create-to-Ready {elapsed:.1f} s (goal <= {LARGE_SYNC_GOAL_SECONDS:.0f} s); {steps}")
    print(f"  baseline: direct `dbsync run` {baseline:.1f} s; ratio {elapsed / baseline:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=100)
    parser.add_argument("--latency-samples", type=int, default=10)
    parser.add_argument("--postings", type=int, default=1_000_000)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dbsync-bench-operator-"))
    with LocalPostgres() as postgres, \
            running_apiserver(kubeconfig_path=workdir / "kubeconfig") as server:
        source = create_database(postgres, "noop_source")
        target = create_database(postgres, "noop_target")
        post(server, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
             yaml.safe_load(CRD_PATH.read_text(encoding="utf-8")))
        time.sleep(0.5)
        post(server, SECRETS_PATH, secret("bench-source", source))
        post(server, SECRETS_PATH, secret("bench-target", target))

        with OperatorProcess(kubeconfig=workdir / "kubeconfig",
                             log_path=workdir / "operator.log") as operator:
            deadline = time.monotonic() + 60
            while "Initial authentication has finished" not in operator.log_text():
                if time.monotonic() > deadline:
                    raise TimeoutError("the operator did not start")
                time.sleep(0.1)
            # Let the first, cold child start before measuring; the operator keeps a spare.
            post(server, RESOURCES_PATH, database_sync("warm-up"))
            wait_ready(server, ["warm-up"], timeout_seconds=120)

            print(f"operator bench on {psutil.cpu_count()} CPUs, "
                  f"load average {psutil.getloadavg()[0]:.1f}")
            bench_latency(server, samples=args.latency_samples, source=source, target=target)
            bench_memory(server, operator, resources=args.resources)
            if not args.skip_large:
                bench_large(server, postgres, workdir, postings=args.postings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
