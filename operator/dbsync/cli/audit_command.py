"""The ``dbsync audit`` command: read, verify and lock down the audit trail.

``tail`` lists the newest events and ``show`` prints one sync's operations as a tree.
``verify`` recomputes the hash chain and exits with code 1 when it is broken. ``grant`` prints,
or runs, the statements that give a role INSERT-only access for writing events.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from dbsync.pipeline.errors import EXIT_FAILED, EXIT_OK, ConfigurationError

AUDIT_DSN_VARIABLE = "DBSYNC_AUDIT_DSN"
DEFAULT_TAIL_LIMIT = 20
MAX_TAIL_LIMIT = 10_000


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``audit`` subcommand and its tail, show, verify and grant subcommands."""
    parser = subparsers.add_parser(
        "audit",
        help="read, verify and secure the audit trail",
        description="Read the audit trail (tail, show), recompute its hash chain (verify) or "
        "print the grants of an INSERT-only writer role (grant).",
    )
    commands = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dsn", metavar="DSN",
        help="connection string of the database holding the audit table: the target, or the "
        f"separate audit database (default: ${AUDIT_DSN_VARIABLE}, which keeps the password "
        "out of the process list)")
    common.add_argument(
        "--output", choices=("text", "json"), default="text",
        help="output format (default: text)")
    common.add_argument(
        "--connect-timeout-seconds", type=int, default=10, metavar="SECONDS",
        help="time to wait for the connection, in seconds (default: 10)")

    tail = commands.add_parser(
        "tail", parents=[common], help="list the newest audit events",
        description="List the newest START and FINISH events, newest last.")
    tail.add_argument(
        "--limit", type=_tail_limit, default=DEFAULT_TAIL_LIMIT, metavar="N",
        help=f"number of events to list, 1 to {MAX_TAIL_LIMIT} (default: {DEFAULT_TAIL_LIMIT})")
    tail.set_defaults(handler=run_tail)

    show = commands.add_parser(
        "show", parents=[common], help="print one sync's operations as a tree",
        description="Print the operations of one sync as a tree of spans with their final "
        "status and duration.")
    show.add_argument("sync_id", type=_sync_id, metavar="SYNC_ID", help="the sync's UUID")
    show.set_defaults(handler=run_show)

    verify = commands.add_parser(
        "verify", parents=[common], help="recompute the hash chain and report the first break",
        description="Recompute the SHA-256 chain of the audit table. Exit code 0 when it is "
        "intact, 1 when a row was altered, removed or replaced (the first such row is named), "
        "2 on errors.")
    verify.add_argument(
        "--since", type=_timestamp, metavar="TIMESTAMP",
        help="check only rows recorded at or after this ISO 8601 time (UTC when it has no "
        "offset), linked to the stored hash of the row before")
    verify.set_defaults(handler=run_verify)

    grant = commands.add_parser(
        "grant", parents=[common], help="print the grants of an INSERT-only writer role",
        description="Print the statements that let ROLE append audit events and read them, "
        "without UPDATE, DELETE or TRUNCATE. With --apply, connect to --dsn as the role that "
        "should own the audit tables, create them if needed and run the statements. ROLE must "
        "exist already.")
    grant.add_argument("role", metavar="ROLE", help="name of the existing writer role")
    grant.add_argument(
        "--schema", default=None, metavar="SCHEMA",
        help="schema of the audit tables (default: where --dsn finds them, or public without "
        "--dsn)")
    grant.add_argument(
        "--apply", action="store_true",
        help="create the audit tables if needed and run the statements on --dsn")
    grant.set_defaults(handler=run_grant)


def _tail_limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid limit {value!r}: pass a whole number") from None
    if not 1 <= limit <= MAX_TAIL_LIMIT:
        raise argparse.ArgumentTypeError(
            f"invalid limit {limit}: pass a number from 1 to {MAX_TAIL_LIMIT}")
    return limit


def _sync_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid sync id {value!r}: pass the UUID printed by 'dbsync run' or shown by "
            "'dbsync audit tail'") from None


def _timestamp(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid timestamp {value!r}: pass ISO 8601, such as 2026-01-31T12:00:00Z") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _dsn(args: argparse.Namespace) -> str:
    dsn = args.dsn or os.environ.get(AUDIT_DSN_VARIABLE, "")
    if not dsn:
        raise ConfigurationError(
            f"missing --dsn: pass --dsn DSN or set the {AUDIT_DSN_VARIABLE} environment variable")
    return str(dsn)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def run_tail(args: argparse.Namespace) -> int:
    """Print the newest audit events."""
    from dbsync.pipeline.audit import fetch_recent_events

    events = fetch_recent_events(_dsn(args), limit=args.limit,
                                 connect_timeout_seconds=args.connect_timeout_seconds)
    if args.output == "json":
        _print_json(events)
        return EXIT_OK
    if not events:
        print("no audit events")
        return EXIT_OK
    print(_render_table(
        ["SEQ", "RECORDED AT (UTC)", "SYNC", "EVENT", "TYPE", "NAME", "STATUS", "MS"],
        [[str(event["sequence"]), _short_time(event["recorded_at"]),
          str(event["sync_id"]), str(event["event_kind"]), str(event["operation_type"]),
          str(event["operation_name"] or ""), str(event["status"]),
          "" if event["duration_ms"] is None else str(event["duration_ms"])]
         for event in events]))
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    """Print one sync's operations as a tree; exit code 1 when the sync is unknown."""
    from dbsync.pipeline.audit import build_operation_tree, fetch_sync_operations

    operations = fetch_sync_operations(_dsn(args), args.sync_id,
                                       connect_timeout_seconds=args.connect_timeout_seconds)
    tree = build_operation_tree(operations)
    if args.output == "json":
        _print_json({"sync_id": str(args.sync_id), "operations": tree})
        return EXIT_OK if operations else EXIT_FAILED
    if not operations:
        print(f"no audit events for sync {args.sync_id}")
        return EXIT_FAILED
    print(f"sync {args.sync_id} (trace {args.sync_id.hex})")
    for line in _render_tree(tree):
        print(line)
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    """Verify the chain; exit code 1 when it is broken."""
    from dbsync.pipeline.audit import verify_chain

    result = verify_chain(_dsn(args), since=args.since,
                          connect_timeout_seconds=args.connect_timeout_seconds)
    if args.output == "json":
        _print_json(result.to_dict())
    else:
        print(result.render_text())
    return EXIT_OK if result.ok else EXIT_FAILED


def run_grant(args: argparse.Namespace) -> int:
    """Print the writer role's grants, or run them with --apply."""
    from dbsync.pipeline.audit_schema import (
        apply_statements,
        ensure_own_schema,
        grant_statements,
    )

    if args.apply and not (args.dsn or os.environ.get(AUDIT_DSN_VARIABLE)):
        raise ConfigurationError(
            f"--apply needs a database: pass --dsn DSN or set {AUDIT_DSN_VARIABLE}")
    dsn = _dsn(args) if (args.dsn or os.environ.get(AUDIT_DSN_VARIABLE)) else None
    if args.apply:
        # Grants need the objects: create them first, as the role running this command.
        assert dsn is not None
        ensure_own_schema(dsn, connect_timeout_seconds=args.connect_timeout_seconds)
    statements = grant_statements(args.role, schema=args.schema, dsn=dsn,
                                  connect_timeout_seconds=args.connect_timeout_seconds)
    rendered = [statement.as_string() for statement in statements]
    if args.apply:
        assert dsn is not None
        apply_statements(dsn, statements, connect_timeout_seconds=args.connect_timeout_seconds)
    if args.output == "json":
        _print_json({"role": args.role, "applied": bool(args.apply), "statements": rendered})
    else:
        for statement in rendered:
            print(f"{statement};")
        if args.apply:
            print(f"-- applied {len(rendered)} statements")
    return EXIT_OK


def _short_time(value: Any) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return str(value)


def _render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(header), *(len(row[index]) for row in rows))
              for index, header in enumerate(headers)]
    lines = ["  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def _render_tree(nodes: Sequence[dict[str, Any]], prefix: str = "") -> list[str]:
    lines: list[str] = []
    for index, node in enumerate(nodes):
        last = index == len(nodes) - 1
        branch = "└─ " if last else "├─ "
        duration = "" if node["duration_ms"] is None else f"  {node['duration_ms']} ms"
        name = f" {node['name']}" if node.get("name") else ""
        migration = f" [{node['migration_name']}]" if node.get("migration_name") else ""
        error = f"  error: {node['error']}" if node.get("error") else ""
        lines.append(f"{prefix}{branch}{node['operation_type']}{name}{migration}  "
                     f"{node['status']}{duration}{error}")
        lines.extend(_render_tree(node["children"], prefix + ("   " if last else "│  ")))
    return lines
