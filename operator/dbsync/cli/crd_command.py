"""``dbsync crd``: write the DatabaseSync CustomResourceDefinition generated from the models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dbsync crd``."""
    parser = subparsers.add_parser(
        "crd",
        help="write the DatabaseSync CustomResourceDefinition YAML",
        description="Generate the DatabaseSync CRD from dbsync's pydantic models and write it "
        "to a file ('-' for standard output).",
    )
    parser.add_argument("--output", metavar="PATH", default="crds/databasesync.yaml",
                        help="file to write, or '-' for standard output "
                        "(default crds/databasesync.yaml)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write the CRD and return 0."""
    from dbsync.k8s.crd import render_crd, write_crd

    if args.output == "-":
        sys.stdout.write(render_crd())
        return 0
    path = write_crd(Path(args.output))
    print(f"wrote {path}", file=sys.stderr)
    return 0
