"""``dbsync operator``: run the Kubernetes operator that reconciles DatabaseSync resources."""

from __future__ import annotations

import argparse
import os

# The Deployment sets this to its own image, so sync Jobs run the operator's dbsync version.
JOB_IMAGE_VARIABLE = "DBSYNC_JOB_IMAGE"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dbsync operator``."""
    parser = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator for DatabaseSync resources",
        description="Watch DatabaseSync resources and run a sync in a child process for each "
        "create, spec change, run-at annotation, changed Secret or ConfigMap, and interval. "
        "Credentials come from the kubeconfig (KUBECONFIG) or the pod's service account.",
    )
    parser.add_argument("--namespace", "-n", action="append", metavar="NS",
                        help="namespace to watch (repeatable, or comma-separated)")
    parser.add_argument("--all-namespaces", "-A", action="store_true",
                        help="watch every namespace (needs a ClusterRole)")
    parser.add_argument("--max-concurrent-syncs", type=int, default=2, metavar="N",
                        help="syncs running at once, each in its own process (default 2)")
    parser.add_argument("--liveness-port", type=int, metavar="PORT",
                        help="serve kopf's liveness endpoint at http://0.0.0.0:PORT/healthz")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics")
    parser.add_argument("--retry-base-seconds", type=float, default=1.0, metavar="SECONDS",
                        help="first retry delay after a transient failure; doubles per "
                        "failure (default 1)")
    parser.add_argument("--retry-max-seconds", type=float, default=300.0, metavar="SECONDS",
                        help="maximum retry delay in seconds (default 300)")
    parser.add_argument("--no-prestart", action="store_true",
                        help="do not keep a spare sync process started ahead of time")
    parser.add_argument("--executor", choices=("process", "job"), default="process",
                        help="where syncs run unless a resource sets spec.executor: process "
                        "(a child process of the operator, default) or job (a Kubernetes Job "
                        "per sync)")
    parser.add_argument("--job-image", metavar="IMAGE",
                        default=os.environ.get(JOB_IMAGE_VARIABLE),
                        help="image with dbsync installed that sync Jobs run; default "
                        f"${JOB_IMAGE_VARIABLE}, else dbsync-operator:0.1.0")
    parser.add_argument("--job-service-account", default="dbsync-sync-runner", metavar="NAME",
                        help="service account of sync Jobs' pods, in each resource's "
                        "namespace (default dbsync-sync-runner)")
    parser.add_argument("--job-ttl-seconds", type=int, default=3600, metavar="SECONDS",
                        help="ttlSecondsAfterFinished of sync Jobs (default 3600)")
    parser.add_argument("--job-cpu-limit", default="1", metavar="QUANTITY",
                        help="CPU limit of a sync Job's container (default 1)")
    parser.add_argument("--job-memory-limit", default="512Mi", metavar="QUANTITY",
                        help="memory limit of a sync Job's container (default 512Mi)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log kopf's debug output")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Start the operator and return its exit code when it stops."""
    from dbsync.k8s.operator_main import OperatorSettings, namespaces_from, run_operator

    settings = OperatorSettings(
        namespaces=namespaces_from(args.namespace),
        all_namespaces=args.all_namespaces,
        max_concurrent_syncs=args.max_concurrent_syncs,
        liveness_port=args.liveness_port,
        metrics_port=args.metrics_port,
        retry_base_seconds=args.retry_base_seconds,
        retry_max_seconds=args.retry_max_seconds,
        prestart_children=not args.no_prestart,
        verbose=args.verbose,
        executor=args.executor,
        job_image=args.job_image,
        job_service_account=args.job_service_account,
        job_ttl_seconds=args.job_ttl_seconds,
        job_cpu_limit=args.job_cpu_limit,
        job_memory_limit=args.job_memory_limit,
    )
    return run_operator(settings)
