"""``dbsync operator``: run the Kubernetes operator that reconciles DatabaseSync resources."""

from __future__ import annotations

import argparse


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
    )
    return run_operator(settings)
