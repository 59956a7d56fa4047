"""``dbsync run``: one sync of a target database to its source, as a report and an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dbsync.pipeline import logs
from dbsync.pipeline.errors import ConfigurationError, DbsyncError, describe_kind
from dbsync.pipeline.report import usage_error_report

logger = logging.getLogger("dbsync.cli")

SOURCE_DSN_VARIABLE = "DBSYNC_SOURCE_DSN"
TARGET_DSN_VARIABLE = "DBSYNC_TARGET_DSN"

# The last sentence of every error about a request file's format: where to see a valid one.
REQUEST_FORMAT_HINT = ("See examples/request.json in the dbsync repository for a complete "
                       "request and docs/request.md for every field")

# JSON's names for the values that json.loads returns. bool comes first because it is a
# subclass of int.
JSON_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"),
    (list, "an array"),
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dbsync run``."""
    parser = subparsers.add_parser(
        "run",
        help="bring a target database to its source's migration state and check it",
        description="Migrate the target, diff its schema against the source, check the "
        "ledger, and record every step in the audit table. Exit 0 when every success "
        "criterion holds, 1 when the sync ran but one failed, 2 on bad usage or an "
        "unreachable database.",
    )
    add_request_arguments(parser)
    parser.add_argument("--approved-plan", metavar="HASH",
                        help="apply only if the plan computed under the lock has this hash "
                        "(from 'dbsync plan')")
    parser.add_argument("--approver", metavar="NAME",
                        help="who approved the plan, recorded in the audit trail as given "
                        "(dbsync cannot verify it)")
    parser.add_argument("--config-env", metavar="VARIABLE",
                        help="read the whole request as JSON from this environment variable "
                        "(how a sync Job's pod gets it); the request options are then ignored, "
                        "while --output and --log-level still apply")
    add_log_level_argument(parser)
    parser.set_defaults(handler=run)


def add_log_level_argument(parser: argparse.ArgumentParser, *,
                           default_name: str = "info") -> None:
    """Add --log-level, which run, plan and ledger share."""
    parser.add_argument("--log-level", type=str.lower, choices=tuple(logs.LEVELS),
                        help="minimum level of the log lines written to standard error; "
                        f"default ${logs.LOG_LEVEL_VARIABLE}, else {default_name}")


class DeprecatedRequestOption(argparse.Action):
    """Store ``--config FILE`` like ``--request FILE`` and note that the old name was used."""

    # argparse fixes this signature, so the unused parser and option_string stay.
    def __call__(self, parser: argparse.ArgumentParser,  # noqa: ARG002
                 namespace: argparse.Namespace, values: str | Sequence[Any] | None,
                 option_string: str | None = None) -> None:  # noqa: ARG002
        setattr(namespace, self.dest, values)
        namespace.deprecated_config_option = True


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options that describe a sync request (shared by run and plan)."""
    parser.add_argument("--source", metavar="DSN", default=os.environ.get(SOURCE_DSN_VARIABLE),
                        help=f"source (reference) database; default ${SOURCE_DSN_VARIABLE}")
    parser.add_argument("--target", metavar="DSN", default=os.environ.get(TARGET_DSN_VARIABLE),
                        help=f"target database to bring in step; default ${TARGET_DSN_VARIABLE}")
    parser.add_argument("--migrations", metavar="DIR", type=Path,
                        help="Alembic directory, or a flat directory of revision files")
    parser.add_argument("--revision", default="head",
                        help="head (default), source (the source's current revision) or a "
                        "revision id")
    parser.add_argument("--transaction-mode", choices=("all", "per-revision"), default="all",
                        help="all: every pending revision in one transaction (default); "
                        "per-revision: each revision commits alone")
    parser.add_argument("--dry-run", nargs="?", const="plan", choices=("plan", "rehearse"),
                        help="plan: show pending revisions and their SQL; rehearse: run them "
                        "on the target and roll back. Bare --dry-run means plan")
    parser.add_argument("--allow-downgrade", action="store_true",
                        help="run downgrades when the target is ahead of the wanted revision")
    parser.add_argument("--ledger", metavar="FILE", type=Path,
                        help="ledger YAML file; the ledger step is skipped without it")
    parser.add_argument("--audit-dsn", metavar="DSN",
                        help="database for the audit table; default the target")
    parser.add_argument("--lock-wait", metavar="SECONDS", type=float, default=60.0,
                        help="how long to wait for another sync's advisory lock (default 60)")
    parser.add_argument("--lock-timeout-ms", type=int, metavar="MS",
                        help="lock_timeout for migration statements, in milliseconds")
    parser.add_argument("--statement-timeout-ms", type=int, metavar="MS",
                        help="statement_timeout for migration statements, in milliseconds")
    parser.add_argument("--connect-timeout-seconds", "--connect-timeout", metavar="SECONDS",
                        type=int, default=10,
                        help="connection timeout per database, in seconds (default 10); "
                        "--connect-timeout is the same option")
    parser.add_argument("--traceparent", metavar="HEADER",
                        help="W3C traceparent of an outer trace this sync joins")
    parser.add_argument("--ignore-schema", action="append", default=[], metavar="SCHEMA",
                        help="schema the diff ignores (repeatable)")
    parser.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                        help="glob of qualified names the diff ignores (repeatable)")
    # The dest stays "config", the option's name before --request, which plan_command reads.
    parser.add_argument("--request", dest="config", metavar="FILE",
                        help="read the whole request as JSON from FILE, or from standard input "
                        "with '-' (keeps credentials off the command line); the request options "
                        "are then ignored, while --output and --log-level still apply. "
                        "--config FILE is the deprecated old name of this option")
    # --config is hidden from --help because 'dbsync ledger --config' names a ledger YAML
    # file, and one option name for two kinds of file is easy to mix up.
    parser.add_argument("--config", dest="config", metavar="FILE",
                        action=DeprecatedRequestOption, help=argparse.SUPPRESS)
    parser.add_argument("--output", choices=("text", "json"), default="text",
                        help="report format on standard output (default text)")


def request_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Build the request fields from command line options, loading the ledger file."""
    if not args.source:
        raise ConfigurationError(
            f"missing source database: pass --source DSN or set ${SOURCE_DSN_VARIABLE}")
    if not args.target:
        raise ConfigurationError(
            f"missing target database: pass --target DSN or set ${TARGET_DSN_VARIABLE}")

    ledger: Any = None
    if args.ledger is not None:
        from dbsync.pipeline.ledger import load_ledger_config

        ledger = load_ledger_config(args.ledger)

    return {
        "source_dsn": args.source,
        "target_dsn": args.target,
        "migrations_dir": args.migrations,
        "revision": args.revision,
        "transaction_mode": args.transaction_mode,
        "dry_run": args.dry_run or "off",
        "allow_downgrade": args.allow_downgrade,
        "ledger": ledger,
        "audit_dsn": args.audit_dsn,
        "lock_wait_seconds": args.lock_wait,
        "lock_timeout_ms": args.lock_timeout_ms,
        "statement_timeout_ms": args.statement_timeout_ms,
        "connect_timeout_seconds": args.connect_timeout_seconds,
        "traceparent": args.traceparent,
        "approved_plan": getattr(args, "approved_plan", None),
        "approver": getattr(args, "approver", None),
        "diff": {"ignore_schemas": args.ignore_schema, "ignore_patterns": args.ignore},
    }


def request_from_config(location: str) -> dict[str, Any]:
    """Read the request fields as a JSON object from a file, or from standard input for '-'."""
    try:
        text = sys.stdin.read() if location == "-" else Path(location).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"cannot read the request file {location}: {error}") from None

    origin = "the request on standard input" if location == "-" else f"the request file {location}"
    if not text.strip():
        raise ConfigurationError(
            f"{origin} is empty: write the request as one JSON object. {REQUEST_FORMAT_HINT}")
    return _parse_request_json(text, origin=origin)


def request_from_environment(variable: str) -> dict[str, Any]:
    """Read the request fields as a JSON object from the environment variable ``variable``."""
    text = os.environ.get(variable)
    if not text:
        raise ConfigurationError(f"environment variable {variable} (--config-env) is not set "
                                 "or empty: set it to the request JSON")
    return _parse_request_json(text, origin=f"the request in ${variable} (--config-env)")


def _parse_request_json(text: str, *, origin: str) -> dict[str, Any]:
    """Parse ``text`` as one JSON object. ``origin`` names its source in error messages."""
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigurationError(
            f"{origin} is not valid JSON at line {error.lineno}, column {error.colno} "
            f"({error.msg}): fix the JSON syntax at that position. {REQUEST_FORMAT_HINT}"
        ) from None

    if not isinstance(loaded, dict):
        raise ConfigurationError(
            f"{origin} contains {describe_kind(loaded, JSON_KINDS)}, not a JSON object: write the "
            f"request as one JSON object. {REQUEST_FORMAT_HINT}")
    return loaded


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Read the request from --request, --config-env or the options, for run and plan.

    A Job's request names environment variables instead of carrying DSNs, so those are
    resolved here too.
    """
    from dbsync.pipeline.request import resolve_environment_dsns

    if args.config:
        fields = request_from_config(args.config)
    elif getattr(args, "config_env", None):
        fields = request_from_environment(args.config_env)
    else:
        fields = request_from_arguments(args)
    return resolve_environment_dsns(fields, os.environ)


def validation_message(error: ValidationError) -> str:
    """Summarize pydantic's errors as one line naming each invalid field."""
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "request"
        problems.append(f"{location}: {item['msg']}")
    return "invalid sync request: " + "; ".join(problems)


def log_level(args: argparse.Namespace, *, default: int = logging.INFO) -> int:
    """Return the level from --log-level, else from $DBSYNC_LOG_LEVEL, else ``default``."""
    if args.log_level is not None:
        return logs.level_from_name(args.log_level, origin="--log-level")
    return logs.level_from_environment(os.environ, default=default)


def _is_plan_hash(value: str) -> bool:
    return len(value) == 64 and all(character in "0123456789abcdef" for character in value)


def run(args: argparse.Namespace) -> int:
    """Run one sync from the parsed arguments and print the report."""
    from dbsync.pipeline.request import SyncRequest
    from dbsync.pipeline.runner import run_sync
    from dbsync.pipeline.termination import write_termination_message

    sync_id = uuid.uuid4()
    dry_run = args.dry_run or "off"
    try:
        logs.configure(json_output=True if args.output == "json" else None,
                       level=log_level(args))
        if getattr(args, "deprecated_config_option", False):
            logger.warning("--config is the deprecated old name of --request for dbsync run: "
                           "pass the request file as --request FILE")
        fields = request_fields(args)
        fields.setdefault("sync_id", str(sync_id))
        approved = fields.get("approved_plan")
        if approved is not None and not _is_plan_hash(str(approved)):
            raise ConfigurationError(
                f"approved_plan (--approved-plan) {approved!r} is not a plan hash: pass the "
                "64-character lowercase hex hash that 'dbsync plan' prints")
        try:
            request = SyncRequest.model_validate(fields)
        except ValidationError as error:
            raise ConfigurationError(validation_message(error)) from None
        sync_id = request.sync_id or sync_id
        dry_run = request.dry_run.value
        report = run_sync(request)
    except DbsyncError as error:
        if args.output == "json":
            failed = usage_error_report(
                sync_id=str(sync_id), trace_id=sync_id.hex, dry_run=dry_run,
                reason=error.reason, message=str(error), transient=error.transient)
            print(failed.to_json())
        # In a sync Job's pod the operator reads the outcome from the termination message.
        write_termination_message(usage_error_report(
            sync_id=str(sync_id), trace_id=sync_id.hex, dry_run=dry_run, reason=error.reason,
            message=str(error), transient=error.transient).to_dict())
        raise

    write_termination_message(report.to_dict())
    print(report.to_json() if args.output == "json" else report.render_text())
    return report.exit_code
