"""Entry point of the ``dbsync`` command: builds the argument parser from each command module.

Each command module exposes ``add_parser(subparsers)``, which registers one subcommand and sets
``handler``, a function taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from dbsync import __version__
from dbsync.pipeline.errors import EXIT_USAGE, DbsyncError

# A shell reports a process ended by SIGPIPE as 128 + 13.
EXIT_BROKEN_PIPE = 141

# Modules are imported by name so that a slow import (kopf for `dbsync operator`) costs only
# the commands that need it: each module keeps its heavy imports inside the handler.
COMMAND_MODULES = (
    "dbsync.cli.run_command",
    "dbsync.cli.plan_command",
    "dbsync.cli.diff_command",
    "dbsync.cli.ledger_command",
    "dbsync.cli.audit_command",
    "dbsync.cli.demo_command",
    "dbsync.cli.crd_command",
    "dbsync.cli.operator_command",
    "dbsync.cli.dev_command",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="dbsync",
        description="Bring a PostgreSQL target to its source's migration state, check schema "
        "and ledger, and audit every step.",
    )
    parser.add_argument("--version", action="version", version=f"dbsync {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only a missing command module itself is tolerated; a broken import inside one
            # must surface.
            if error.name != module_name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        exit_code = handler(args)
        # Flushing here, not at interpreter exit, lets a closed pipe be handled below.
        sys.stdout.flush()
        return exit_code
    except DbsyncError as error:
        print(f"dbsync: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("dbsync: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (head, less) closed the pipe, so stop quietly.  Pointing standard output
        # at /dev/null keeps the flush at interpreter exit from raising the same error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
