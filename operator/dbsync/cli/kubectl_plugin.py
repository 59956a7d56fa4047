"""``kubectl dbsync``: a kubectl plugin to review and approve a DatabaseSync's pending plan.

kubectl runs any ``kubectl-<name>`` executable on ``PATH`` as ``kubectl <name>``; this one is
installed as the ``kubectl-dbsync`` console script.  ``plan NAME`` shows the plan the operator
published in the resource's status; ``approve NAME`` sets the ``dbsync.io/approved-plan``
annotation to that plan's hash.  The annotation only approves that exact hash: if the
target changes before the operator applies it, the operator publishes a new plan instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

GROUP = "dbsync.io"
VERSION = "v1alpha1"
PLURAL = "databasesyncs"
APPROVED_PLAN_ANNOTATION = "dbsync.io/approved-plan"
APPROVED_BY_ANNOTATION = "dbsync.io/approved-by"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class PluginError(Exception):
    """A failure to report as one line on standard error."""


def _connection_options(*, in_subcommand: bool) -> argparse.ArgumentParser:
    """Return the kubeconfig options, accepted before and after the subcommand.

    kubectl passes a plugin every argument after its name, so ``kubectl dbsync approve NAME
    --kubeconfig FILE`` puts the option after the subcommand.  There the defaults are
    suppressed, so an option given before the subcommand is not overwritten.
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--kubeconfig",
                         default=(argparse.SUPPRESS if in_subcommand
                                  else os.environ.get("KUBECONFIG")),
                         help="kubeconfig file (default $KUBECONFIG, then ~/.kube/config)")
    options.add_argument("--context", default=argparse.SUPPRESS if in_subcommand else None,
                         help="kubeconfig context to use")
    options.add_argument("-n", "--namespace",
                         default=argparse.SUPPRESS if in_subcommand else None,
                         help="namespace (default: the context's)")
    return options


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl dbsync", parents=[_connection_options(in_subcommand=False)],
        description="Review and approve the pending plan of a DatabaseSync resource.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    shared = [_connection_options(in_subcommand=True)]

    plan = commands.add_parser("plan", parents=shared, help="show the plan waiting for approval")
    plan.add_argument("name", help="DatabaseSync name")
    plan.add_argument("-o", "--output", choices=("text", "json"), default="text")

    approve = commands.add_parser(
        "approve", parents=shared,
        help="approve the plan waiting for approval (sets the annotation)")
    approve.add_argument("name", help="DatabaseSync name")
    approve.add_argument("--hash", dest="expected_hash", metavar="HASH",
                         help="approve only if the pending plan still has this hash")
    return parser


def _api(args: argparse.Namespace) -> tuple[Any, str]:
    """Return a CustomObjectsApi and the namespace to use."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=args.kubeconfig, context=args.context)
        _, active = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=args.kubeconfig)
    except (ConfigException, OSError) as error:
        raise PluginError(f"cannot load the kubeconfig: {error}; pass --kubeconfig FILE or "
                          "set KUBECONFIG") from None
    namespace = args.namespace or (active or {}).get("context", {}).get("namespace") or "default"
    return client.CustomObjectsApi(), namespace


def _read(api: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    try:
        found: dict[str, Any] = api.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            raise PluginError(f"DatabaseSync {namespace}/{name} not found: check the name and "
                              "pass -n NAMESPACE") from None
        raise PluginError(f"reading DatabaseSync {namespace}/{name} failed: HTTP "
                          f"{error.status} {error.reason}") from None
    return found


def _pending_plan(resource: dict[str, Any]) -> dict[str, Any] | None:
    status = resource.get("status") or {}
    plan = status.get("plan")
    if not isinstance(plan, dict) or not plan.get("hash"):
        return None
    ready: dict[str, Any] = next((condition for condition in status.get("conditions", [])
                  if condition.get("type") == "Ready"), {})
    if ready.get("reason") not in ("ApprovalPending", "PlanChanged", "PlanExpired"):
        return None
    return plan


def _show_plan(resource: dict[str, Any], plan: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(plan, indent=2))
        return
    metadata = resource.get("metadata", {})
    print(f"DatabaseSync {metadata.get('namespace')}/{metadata.get('name')}: plan waiting "
          "for approval")
    print(f"  hash:             {plan.get('hash')}")
    print(f"  created at:       {plan.get('createdAt')}")
    if plan.get("expiresAt"):
        print(f"  expires at:       {plan.get('expiresAt')}")
    print(f"  current revision: {plan.get('currentRevision')}")
    print(f"  target revision:  {plan.get('targetRevision')}")
    revisions = plan.get("revisions") or []
    print(f"  revisions:        {', '.join(revisions) if revisions else 'none'}")
    not_atomic = plan.get("nonTransactional") or []
    if not_atomic:
        print(f"  NOT atomic:       {', '.join(not_atomic)}")
    print(f"  ledger checks:    {', '.join(plan.get('ledgerChecks') or []) or 'none'}")
    print(f"The full SQL is in the audit trail: dbsync audit show "
          f"{plan.get('syncId') or 'SYNC_ID'}, the PLAN operation with this hash.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the plugin and return its exit code."""
    args = _build_parser().parse_args(argv)
    try:
        api, namespace = _api(args)
        resource = _read(api, namespace, args.name)
        plan = _pending_plan(resource)
        if plan is None:
            raise PluginError(
                f"DatabaseSync {namespace}/{args.name} has no plan waiting for approval: "
                "set spec.approval.mode to Manual and wait for Ready reason ApprovalPending")

        if args.command == "plan":
            _show_plan(resource, plan, args.output)
            return EXIT_OK

        plan_hash = str(plan["hash"])
        if args.expected_hash and args.expected_hash != plan_hash:
            raise PluginError(
                f"the pending plan of {namespace}/{args.name} is {plan_hash}, not "
                f"{args.expected_hash}: review it with 'kubectl dbsync plan {args.name}'")
        approver = os.environ.get("USER") or "unknown"
        body = {"metadata": {"annotations": {APPROVED_PLAN_ANNOTATION: plan_hash,
                                             APPROVED_BY_ANNOTATION: approver}}}
        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, args.name, body)
        print(f"approved plan {plan_hash} of DatabaseSync {namespace}/{args.name}")
        return EXIT_OK
    except PluginError as error:
        print(f"kubectl dbsync: error: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
