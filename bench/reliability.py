"""Reliability suite: run every scenario, the slow ones included, and print the figures.

Runs pytest on the reliability scenarios (process kills, operator restarts, database faults,
concurrency, bad input, secret leakage and the hypothesis properties) with the ``slow``
marker included, collects the figures each scenario appends to a JSON-lines file
(``RELIABILITY_FIGURES_PATH``, see ``tests/reliability/harness.py``), and prints one
Markdown section per area for ``docs/reliability.md``.

Usage: ``python bench/reliability.py [--fast-only] [--keep FILE] [pytest arguments...]``.
Exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
SCENARIO_PATHS = (
    "tests/reliability",
    "tests/test_bad_input_cli.py",
    "tests/test_bad_input_manifests.py",
    "tests/test_secret_leak.py",
    "tests/test_properties_models.py",
    "tests/test_properties_ledger.py",
)


def run_pytest(*, fast_only: bool, figures: Path, junit: Path,
               extra: list[str]) -> tuple[int, float]:
    """Run the scenarios and return pytest's exit status and the wall-clock seconds."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-m", "not slow" if fast_only else "", f"--junitxml={junit}",
               *SCENARIO_PATHS, *extra]
    environment = {**os.environ, "RELIABILITY_FIGURES_PATH": str(figures)}
    started = time.monotonic()
    completed = subprocess.run(command, cwd=REPOSITORY, env=environment, check=False)
    return completed.returncode, time.monotonic() - started


def test_counts(junit: Path) -> dict[str, int]:
    """Return passed, failed, skipped and error counts from pytest's JUnit XML."""
    root = ElementTree.parse(junit).getroot()
    suite = root.find("testsuite") if root.tag == "testsuites" else root
    if suite is None:
        raise ValueError(f"{junit} holds no testsuite element")
    total = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0))
    errors = int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors,
            "skipped": skipped}


def load_figures(path: Path) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if path.exists():
        for line in path.read_text("utf-8").splitlines():
            record = json.loads(line)
            grouped[str(record.pop("area"))].append(record)
    return grouped


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no figures recorded)"]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
    return lines


def render(figures: dict[str, list[dict[str, Any]]], counts: dict[str, int],
           seconds: float) -> str:
    """Return the summary and one Markdown table per area."""
    kills = figures.get("process-kill", [])
    restarts = figures.get("operator-restart", [])
    faults = figures.get("database-faults", [])
    fan_in = figures.get("concurrency", [])
    cli = figures.get("bad-input-cli", [])
    manifests = figures.get("bad-input-manifest", [])
    leaks = figures.get("secret-leak", [])
    survived = (sum(1 for row in kills if row.get("recovered"))
                + sum(1 for row in restarts if row.get("ready_after_restart"))
                + sum(1 for row in faults if row.get("recovered", True)))
    syncs = 2 * len(kills) + sum(int(row.get("ready", 0)) for row in fan_in)
    rejected = (sum(1 for row in cli if row.get("rejected"))
                + sum(1 for row in manifests
                      if row.get("rejected") or row.get("outcome") == "stalled"))
    lines = [
        f"tests: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['errors']} errors, {counts['skipped']} skipped in {seconds:.0f} s",
        f"faults survived: {survived} of {len(kills) + len(restarts) + len(faults)}",
        f"syncs run in the kill and concurrency scenarios: {syncs}",
        f"invalid inputs rejected: {rejected} of {len(cli) + len(manifests)}",
        f"canary hits: {sum(int(row.get('canary_hits', 0)) for row in leaks)} "
        f"in {sum(int(row.get('texts_searched', 0)) for row in leaks)} searched texts",
    ]
    for area, rows in figures.items():
        if area.startswith("bad-input"):
            continue
        lines += ["", f"### {area}", "", *_table(rows)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast-only", action="store_true",
                        help="run only the scenarios that CI runs (not marked slow)")
    parser.add_argument("--keep", type=Path, metavar="FILE",
                        help="also write the raw JSON-lines figures to FILE")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="dbsync-reliability-") as workdir:
        figures_path = Path(workdir) / "figures.jsonl"
        junit = Path(workdir) / "junit.xml"
        status, seconds = run_pytest(fast_only=args.fast_only, figures=figures_path,
                                     junit=junit, extra=extra)
        if args.keep is not None and figures_path.exists():
            args.keep.write_text(figures_path.read_text("utf-8"), encoding="utf-8")
        counts = (test_counts(junit) if junit.exists()
                  else {"passed": 0, "failed": 0, "errors": 1, "skipped": 0})
        print(render(load_figures(figures_path), counts, seconds))
    return status


if __name__ == "__main__":
    sys.exit(main())
