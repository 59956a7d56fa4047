"""``dbsync ledger``: run the ledger integrity checks against a target database.

Exit codes: 0 when every selected check passes or is skipped, and 1 when a check fails or
times out.  2 means the configuration, a DSN or a database is unusable, or a check could not
run (ERROR) while none failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dbsync.cli.run_command import add_log_level_argument, log_level
from dbsync.pipeline import logs
from dbsync.pipeline.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigurationError

TARGET_DSN_VARIABLE = "DBSYNC_TARGET_DSN"
SOURCE_DSN_VARIABLE = "DBSYNC_SOURCE_DSN"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``ledger`` subcommand."""
    parser = subparsers.add_parser(
        "ledger",
        help="check that the target's ledger balances",
        description="Run double-entry integrity checks on the target's ledger in one "
        "read-only snapshot, and optionally compare it with the source's ledger.",
    )
    parser.add_argument(
        "--target", metavar="DSN", default=os.environ.get(TARGET_DSN_VARIABLE),
        help=f"connection string of the database to check (default: ${TARGET_DSN_VARIABLE})")
    parser.add_argument(
        "--source", metavar="DSN", default=os.environ.get(SOURCE_DSN_VARIABLE),
        help="connection string of the source database; enables the fingerprint check "
        f"(default: ${SOURCE_DSN_VARIABLE})")
    parser.add_argument(
        "--config", metavar="FILE", type=Path, required=True,
        help="ledger YAML file naming the postings, accounts and transactions tables")
    parser.add_argument(
        "--checks", metavar="NAMES",
        help="comma-separated checks to run instead of the file's selection, for example "
        "transaction_balance,trial_balance")
    parser.add_argument(
        "--output", choices=("text", "json"), default="text",
        help="output format on standard output (default: text)")
    parser.add_argument(
        "--include-amounts", action="store_true",
        help="also print the amounts behind each finding; by default only transaction "
        "ids, account ids and counts are printed")
    # The report goes to standard output, so by default only warnings are logged.
    add_log_level_argument(parser, default_name="warning")
    parser.set_defaults(handler=run)


def _parse_checks(value: str) -> list[str]:
    from dbsync.pipeline.ledger import CheckName

    names = [part.strip() for part in value.split(",") if part.strip()]
    known = {name.value for name in CheckName}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ConfigurationError(
            f"--checks {value!r} names unknown checks {', '.join(unknown) or '(none given)'}: "
            f"choose from {', '.join(sorted(known))}")
    return names


def run(args: argparse.Namespace) -> int:
    """Run the checks and print the result; return the exit code."""
    from dbsync.pipeline.ledger import (
        CheckStatus,
        load_ledger_config,
        parse_ledger_config,
        run_ledger_checks,
    )

    logs.configure(json_output=True if args.output == "json" else None,
                   level=log_level(args, default=logging.WARNING))
    if not args.target:
        raise ConfigurationError(
            f"no target database: pass --target DSN or set ${TARGET_DSN_VARIABLE}")
    config = load_ledger_config(args.config)
    if args.checks is not None:
        data = config.model_dump(by_alias=True)
        data["checks"] = _parse_checks(args.checks)
        config = parse_ledger_config(data, origin=f"--checks with {args.config}")

    result = run_ledger_checks(target_dsn=args.target, config=config, source_dsn=args.source)
    if args.output == "json":
        json.dump(result.to_dict(include_amounts=args.include_amounts), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(result.render_text(include_amounts=args.include_amounts))

    statuses = {check.status for check in result.checks}
    if statuses & {CheckStatus.FAIL, CheckStatus.TIMEOUT}:
        return EXIT_FAILED
    if CheckStatus.ERROR in statuses:
        return EXIT_USAGE
    return EXIT_OK
