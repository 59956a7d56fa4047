"""The ``dbsync diff`` command: compare two schemas and print the differences.

Exit codes: 0 when the schemas match, 1 when they differ, 2 on bad usage or when a database
cannot be reached or read.
"""

from __future__ import annotations

import argparse
import json
import os

from dbsync.pipeline.diff import IGNORABLE_KINDS, DiffOptions, diff_databases
from dbsync.pipeline.errors import EXIT_FAILED, EXIT_OK, ConfigurationError

SOURCE_DSN_VARIABLE = "DBSYNC_SOURCE_DSN"
TARGET_DSN_VARIABLE = "DBSYNC_TARGET_DSN"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``diff`` subcommand."""
    parser = subparsers.add_parser(
        "diff",
        help="compare the schemas of two databases",
        description="Compare the schema of a target database with its source's and list every "
        "difference with the risk of bringing the target in line. Exit code 0 means no "
        "differences, 1 means differences, 2 means an error.",
    )
    parser.add_argument(
        "--source", metavar="DSN",
        help=f"connection string of the reference database (default: ${SOURCE_DSN_VARIABLE}, "
        "which keeps the password out of the process list)")
    parser.add_argument(
        "--target", metavar="DSN",
        help=f"connection string of the database to check (default: ${TARGET_DSN_VARIABLE})")
    parser.add_argument(
        "--ignore-schema", metavar="SCHEMA", action="append", default=[],
        help="leave out every object in this schema (repeatable)")
    parser.add_argument(
        "--ignore", metavar="PATTERN", action="append", default=[],
        help="leave out objects whose qualified name, or whose table's, matches this glob, "
        "for example 'public.tmp_*' (repeatable)")
    parser.add_argument(
        "--ignore-kind", metavar="KIND", action="append", default=[], choices=IGNORABLE_KINDS,
        help=f"leave out one object kind (repeatable): {', '.join(IGNORABLE_KINDS)}")
    parser.add_argument(
        "--include-dbsync-objects", action="store_true",
        help="also compare dbsync's own audit tables and dbsync_* objects")
    parser.add_argument(
        "--connect-timeout-seconds", type=int, default=10, metavar="SECONDS",
        help="time to wait for each connection, in seconds (default: 10)")
    parser.add_argument(
        "--output", choices=("text", "json"), default="text",
        help="report format (default: text)")
    parser.set_defaults(handler=run_diff)


def _dsn_from(value: str | None, variable: str, option: str) -> str:
    dsn = value or os.environ.get(variable, "")
    if not dsn:
        raise ConfigurationError(
            f"missing {option}: pass {option} DSN or set the {variable} environment variable")
    return dsn


def run_diff(args: argparse.Namespace) -> int:
    """Run the diff described by ``args``, print the report and return the exit code."""
    source_dsn = _dsn_from(args.source, SOURCE_DSN_VARIABLE, "--source")
    target_dsn = _dsn_from(args.target, TARGET_DSN_VARIABLE, "--target")
    options = DiffOptions(
        ignore_schemas=tuple(args.ignore_schema),
        ignore_patterns=tuple(args.ignore),
        ignore_kinds=tuple(args.ignore_kind),
        include_dbsync_objects=args.include_dbsync_objects,
        connect_timeout_seconds=args.connect_timeout_seconds,
    )

    result = diff_databases(source_dsn=source_dsn, target_dsn=target_dsn, options=options)

    if args.output == "json":
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.render_text())
    return EXIT_OK if result.in_sync else EXIT_FAILED
