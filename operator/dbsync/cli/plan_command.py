"""``dbsync plan``: print what a sync would do to the target now, and the hash to approve."""

from __future__ import annotations

import argparse
import json
import uuid
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dbsync.cli.run_command import (
    add_log_level_argument,
    add_request_arguments,
    log_level,
    request_fields,
    validation_message,
)
from dbsync.pipeline import logs
from dbsync.pipeline.errors import EXIT_OK, ConfigurationError, DbsyncError
from dbsync.pipeline.report import usage_error_report

if TYPE_CHECKING:
    from dbsync.pipeline.plan import SyncPlan
    from dbsync.pipeline.request import SyncRequest


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dbsync plan``."""
    parser = subparsers.add_parser(
        "plan",
        help="show what a sync would do to the target now, and its plan hash",
        description="Compute the plan of a sync: pending revisions with their checksums and "
        "SQL, the target's revision, a fingerprint of its schema and the ledger checks. The "
        "plan is recorded in the audit trail. 'dbsync run --approved-plan HASH' applies only "
        "while the plan still has that hash.",
    )
    add_request_arguments(parser)
    parser.add_argument("--config-env", metavar="VARIABLE",
                        help="read the whole request as JSON from this environment variable "
                        "(how a plan Job's pod gets it); the request options are then ignored, "
                        "while --output and --log-level still apply")
    add_log_level_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Compute, record and print the plan."""
    from dbsync.pipeline.termination import (
        write_plan_termination_message,
        write_termination_message,
    )

    sync_id = uuid.uuid4()
    try:
        logs.configure(json_output=True if args.output == "json" else None,
                       level=log_level(args))
        request = _request(args)
        sync_id = request.sync_id or sync_id
        plan = _record_plan(request, sync_id)
    except DbsyncError as error:
        # In a plan Job's pod the operator reads the outcome from the termination message.
        write_termination_message(usage_error_report(
            sync_id=str(sync_id), trace_id=sync_id.hex, dry_run="plan", reason=error.reason,
            message=str(error), transient=error.transient).to_dict())
        raise

    write_plan_termination_message(sync_id=str(sync_id), summary=plan.summary())
    if args.output == "json":
        print(json.dumps({"sync_id": str(sync_id), **plan.to_dict(),
                          "summary": plan.summary()}, indent=2))
    else:
        print(plan.render_text())
    return EXIT_OK


def _request(args: argparse.Namespace) -> SyncRequest:
    """Read the request from --request, --config-env or the options, and validate it."""
    from dbsync.pipeline.request import SyncRequest

    fields = request_fields(args)
    try:
        return SyncRequest.model_validate(fields)
    except ValidationError as error:
        raise ConfigurationError(validation_message(error)) from None


def _record_plan(request: SyncRequest, sync_id: uuid.UUID) -> SyncPlan:
    """Compute the plan and record it in the audit trail as a PLAN operation."""
    from dbsync.pipeline.audit import (
        AuditContext,
        AuditTrail,
        OperationStatus,
        OperationType,
        Requester,
    )
    from dbsync.pipeline.diff import DiffOptions
    from dbsync.pipeline.dsn import describe
    from dbsync.pipeline.plan import compute_plan

    plan = compute_plan(
        target_dsn=request.target_dsn, source_dsn=request.source_dsn,
        migrations_dir=request.migrations_dir if request.run_migrations else None,
        revision=request.revision, allow_downgrade=request.allow_downgrade,
        ledger=request.ledger,
        diff_options=DiffOptions(
            ignore_schemas=tuple(request.diff.ignore_schemas),
            ignore_patterns=tuple(request.diff.ignore_patterns),
            ignore_kinds=tuple(request.diff.ignore_kinds),
            connect_timeout_seconds=request.connect_timeout_seconds))

    # The full plan goes to the audit trail, so a later mismatch can list what changed.
    requester = (Requester(**request.requester.model_dump()) if request.requester
                 else Requester.from_cli())
    context = AuditContext(
        sync_id=sync_id, requester=requester,
        database=describe(request.target_dsn, role="target"), plan_hash=plan.hash,
        traceparent=request.traceparent)
    with AuditTrail(dsn=request.audit_dsn or request.target_dsn, context=context,
                    connect_timeout_seconds=request.connect_timeout_seconds) as audit:
        operation = audit.start(OperationType.PLAN, name="plan")
        audit.finish(operation, OperationStatus.SUCCESS, metadata={"plan": plan.to_dict()})
    return plan
