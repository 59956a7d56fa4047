"""Tests that the operator documentation matches the code: CRD reference, runbook, install guide."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import dbsync.pipeline
from dbsync.k8s.conditions import Reason
from dbsync.pipeline.errors import DbsyncError

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "databasesync.yaml"
DOCS = ROOT / "docs"


def load_generator() -> ModuleType:
    path = DOCS / "gen_crd_reference.py"
    spec = importlib.util.spec_from_file_location("gen_crd_reference", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SAMPLE_CRD = {
    "spec": {
        "group": "example.io",
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "versions": [{
            "name": "v1",
            "served": True,
            "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "required": ["size"],
                        "properties": {
                            "size": {"type": "integer", "minimum": 1, "maximum": 9,
                                     "default": 3, "description": "Size | in units."},
                            "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                            "parts": {"type": "array", "maxItems": 4, "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string",
                                                        "pattern": "^(x|y)$"}},
                            }},
                            "labels": {"type": "object",
                                       "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            }},
        }],
    },
}


def table_row(markdown: str, field: str) -> str:
    rows = [line for line in markdown.splitlines() if line.startswith(f"| `{field}` |")]
    assert len(rows) == 1, f"expected one row for {field}, found {len(rows)}"
    return rows[0]


def test_reference_lists_nested_fields() -> None:
    markdown = load_generator().render_reference(SAMPLE_CRD, source="sample.yaml")

    assert table_row(markdown, "spec.size").startswith("| `spec.size` | integer | yes | `3` |")
    assert "1 to 9" in table_row(markdown, "spec.size")
    assert "one of `a`, `b`" in table_row(markdown, "spec.mode")
    assert "| []object |" in table_row(markdown, "spec.parts")
    assert "| string | yes |" in table_row(markdown, "spec.parts[].name")
    assert "| map[string]string |" in table_row(markdown, "spec.labels")


def test_reference_escapes_pipes() -> None:
    """A pipe in a pattern or description would split the Markdown table row."""
    markdown = load_generator().render_reference(SAMPLE_CRD, source="sample.yaml")

    assert "Size \\| in units." in table_row(markdown, "spec.size")
    assert "`^(x\\|y)$`" in table_row(markdown, "spec.parts[].name")


@pytest.mark.skipif(
    not CRD_FILE.exists(),
    reason=f"{CRD_FILE.relative_to(ROOT)} is missing: generate it with `dbsync crd`",
)
def test_crd_reference_is_current() -> None:
    """docs/crd-reference.md is what the generator renders from the committed CRD."""
    generator = load_generator()
    crd = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    committed = (DOCS / "crd-reference.md").read_text(encoding="utf-8")

    assert committed == generator.render_reference(crd), (
        "docs/crd-reference.md is out of date: run python docs/gen_crd_reference.py"
    )


# Reasons of success or work in progress, which need no runbook section.
ROUTINE_REASONS = {
    Reason.SUCCEEDED,
    Reason.UP_TO_DATE,
    Reason.APPLIED,
    Reason.IN_SYNC,
    Reason.BALANCED,
    Reason.RECORDED,
    Reason.SYNCING,
    Reason.RECHECKING,
    Reason.RETRYING,
    Reason.NOT_CONFIGURED,
    Reason.NOT_RUN,
}


def pipeline_error_reasons() -> set[str]:
    """Return the reason of every DbsyncError subclass in the pipeline's modules."""
    for module in pkgutil.iter_modules(dbsync.pipeline.__path__):
        importlib.import_module(f"dbsync.pipeline.{module.name}")
    reasons: set[str] = set()
    pending: list[type[DbsyncError]] = [DbsyncError]
    while pending:
        error_class = pending.pop()
        reasons.add(error_class.reason)
        pending.extend(error_class.__subclasses__())
    return reasons


def test_runbook_covers_failure_reasons() -> None:
    """Each failure reason the operator writes has its own runbook section."""
    runbook = (DOCS / "runbook.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^###? `?([A-Za-z]+)`?\s*$", runbook, flags=re.MULTILINE))

    failure_reasons = {reason.value for reason in Reason if reason not in ROUTINE_REASONS}
    failure_reasons |= pipeline_error_reasons()
    missing = sorted(failure_reasons - headings)

    assert missing == []


def test_install_guide_paths_exist() -> None:
    """Every repository path named in the install guide exists."""
    guide = (DOCS / "install.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"\b((?:deploy|crds|examples|docs)/[\w./-]*\w)", guide))

    missing = sorted(path for path in paths if not (ROOT / path).exists())

    assert paths != set()
    assert missing == []
