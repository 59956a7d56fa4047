"""Revision directories: loading, checksums and detection of steps that cannot roll back.

dbsync accepts two layouts. A project directory contains Alembic's ``env.py`` and a ``versions/``
folder; a flat directory contains only revision files (as a Kubernetes ConfigMap mounts them),
and dbsync then supplies the Alembic environment from :mod:`dbsync.pipeline.flat_env`.

Each revision file is read once: its SHA-256 goes to the checksum table, and its syntax tree
is searched for statements that PostgreSQL rejects inside a transaction block, so a plan can
flag them before anything runs.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError

from dbsync.pipeline.dsn import redact_text
from dbsync.pipeline.errors import ConfigurationError

logger = logging.getLogger("dbsync.migrate")

FLAT_ENV_DIR = Path(__file__).resolve().parent / "flat_env"

# Statements PostgreSQL rejects inside a transaction block ("cannot run inside a transaction
# block"), plus a bare COMMIT, which ends the surrounding transaction early.
_NON_TRANSACTIONAL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bINDEX\s+CONCURRENTLY\b", re.IGNORECASE), "INDEX ... CONCURRENTLY"),
    (re.compile(r"\bREINDEX\b[^;]*?\bCONCURRENTLY\b", re.IGNORECASE), "REINDEX CONCURRENTLY"),
    (re.compile(r"\bDETACH\s+PARTITION\b[^;]*?\bCONCURRENTLY\b", re.IGNORECASE),
     "DETACH PARTITION ... CONCURRENTLY"),
    (re.compile(r"\bVACUUM\b", re.IGNORECASE), "VACUUM"),
    (re.compile(r"\bALTER\s+SYSTEM\b", re.IGNORECASE), "ALTER SYSTEM"),
    (re.compile(r"\b(?:CREATE|DROP)\s+DATABASE\b", re.IGNORECASE), "CREATE/DROP DATABASE"),
    (re.compile(r"\b(?:CREATE|DROP)\s+TABLESPACE\b", re.IGNORECASE), "CREATE/DROP TABLESPACE"),
    # Only COMMIT: a bare END also closes PL/pgSQL blocks in CREATE FUNCTION bodies.
    (re.compile(r"(?:^|;)\s*COMMIT\s*(?:;|$)", re.IGNORECASE | re.MULTILINE), "COMMIT"),
)

_ADD_VALUE = re.compile(
    r"\bALTER\s+TYPE\s+(?P<type>[\w.\"]+)\s+ADD\s+VALUE\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"'(?P<value>(?:[^']|'')*)'",
    re.IGNORECASE,
)


class HazardKind(StrEnum):
    """Reason a revision cannot run atomically with the others."""

    AUTOCOMMIT_BLOCK = "autocommit_block"
    NON_TRANSACTIONAL_STATEMENT = "non_transactional_statement"


@dataclass(frozen=True)
class Hazard:
    """One reason a revision is not atomic, with the statement or value that causes it."""

    kind: HazardKind
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class EnumAddition:
    """A label added by ``ALTER TYPE ... ADD VALUE``."""

    type_name: str
    value: str


@dataclass(frozen=True)
class CodeAnalysis:
    """Static scan result for one direction (upgrade or downgrade) of a revision."""

    hazards: tuple[Hazard, ...] = ()
    enum_additions: tuple[EnumAddition, ...] = ()
    # String constants in source order, docstrings excluded: SQL text and literal values.
    literals: tuple[str, ...] = ()

    @property
    def transactional(self) -> bool:
        return not self.hazards

    def uses_value(self, value: str, *, after_addition: bool) -> bool:
        """Check whether ``value`` is used as a literal, after its ADD VALUE if requested."""
        quoted = "'" + value.replace("'", "''") + "'"
        candidates = self.literals
        if after_addition:
            position = next((index for index, text in enumerate(self.literals)
                             if _adds_value(text, value)), None)
            if position is None:
                return False
            candidates = self.literals[position + 1:]
            # The rest of the ADD VALUE statement's own string may use it too.
            tail = _text_after_addition(self.literals[position], value)
            if quoted in tail:
                return True
        return any(text == value or (quoted in text and not _adds_value(text, value))
                   for text in candidates)


@dataclass(frozen=True)
class RevisionFile:
    """One revision file: id, where it is, its checksum and what the scan found."""

    revision: str
    down_revision: str | tuple[str, ...] | None
    path: Path
    description: str
    sha256: str
    upgrade: CodeAnalysis
    downgrade: CodeAnalysis

    @property
    def file_name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class ScriptSet:
    """A validated revision directory and the Alembic objects that run it."""

    migrations_dir: Path
    script_location: Path
    version_locations: tuple[Path, ...]
    flat: bool
    uses_own_env: bool
    revisions: dict[str, RevisionFile]
    notes: tuple[str, ...] = ()
    script_directory: ScriptDirectory = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def make_config(self, *, output_buffer: Any = None) -> Config:
        """Build a fresh Alembic ``Config`` for one run (attributes must not be shared)."""
        return _alembic_config(self.script_location, self.version_locations,
                               output_buffer=output_buffer)

    def heads(self) -> tuple[str, ...]:
        return tuple(self.script_directory.get_heads())

    def script(self, revision: str) -> Script:
        found = self.script_directory.get_revision(revision)
        assert found is not None
        return found

    def ancestors(self, revision: str | None) -> list[str]:
        """Return ``revision`` and every revision below it, newest first."""
        if revision is None:
            return []
        return [script.revision for script in
                self.script_directory.iterate_revisions(revision, "base")]

    def revisions_between(self, upper: str, lower: str | None) -> list[str]:
        """Return the revisions above ``lower`` up to ``upper``, oldest first."""
        found = self.script_directory.iterate_revisions(upper, lower or "base")
        return [script.revision for script in reversed(list(found))]


def _alembic_config(script_location: Path, version_locations: tuple[Path, ...], *,
                    output_buffer: Any = None) -> Config:
    config = Config(output_buffer=output_buffer)
    config.set_main_option("script_location", str(script_location))
    if version_locations:
        config.set_main_option("path_separator", "os")
        config.set_main_option("version_locations",
                               ":".join(str(path) for path in version_locations))
    return config


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of the file's bytes (symlinks followed, as ConfigMaps use them)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _env_shares_connection(env_path: Path) -> bool:
    """Check whether ``env.py`` uses the connection dbsync passes in ``config.attributes``."""
    text = env_path.read_text(encoding="utf-8", errors="replace")
    return "attributes" in text and "connection" in text


def load_scripts(migrations_dir: Path) -> ScriptSet:
    """Load and validate a revision directory, raising ConfigurationError naming the path."""
    directory = Path(migrations_dir)
    if not directory.exists():
        raise ConfigurationError(
            f"the migrations directory {directory} does not exist: pass the directory that "
            "holds the Alembic env.py and versions/, or a directory of revision files")
    if not directory.is_dir():
        raise ConfigurationError(
            f"the migrations path {directory} is not a directory: pass the directory that "
            "holds the revision files, not one file")

    notes: list[str] = []
    env_path = directory / "env.py"
    flat = not env_path.is_file()
    uses_own_env = flat
    if flat:
        script_location = FLAT_ENV_DIR
        version_locations: tuple[Path, ...] = (directory,)
    else:
        versions = directory / "versions"
        if not versions.is_dir():
            raise ConfigurationError(
                f"the migrations directory {directory} has an env.py but no versions/ folder: "
                "put the revision files in versions/, or remove env.py to use a flat directory")
        # Why: an env.py that opens its own engine would migrate outside dbsync's transaction,
        # lock and timeouts, so it is replaced by dbsync's environment.
        if _env_shares_connection(env_path):
            script_location = directory
            version_locations = ()
        else:
            uses_own_env = True
            script_location = FLAT_ENV_DIR
            version_locations = (versions,)
            notes.append(
                f"{env_path} does not use config.attributes['connection'], so dbsync runs the "
                "revisions with its own Alembic environment instead")
            logger.warning("%s", notes[-1])

    version_dirs = version_locations or (directory / "versions",)
    if not any(_revision_candidates(path) for path in version_dirs):
        searched = ", ".join(str(path) for path in version_dirs)
        raise ConfigurationError(
            f"the migrations directory {searched} contains no revision files (*.py): add "
            "Alembic revision files or point the migrations directory at the right path")

    script_directory = _open_script_directory(directory, script_location, version_locations)
    revisions = {
        script.revision: _describe_revision(script)
        for script in _walk_scripts(directory, script_directory)
    }
    return ScriptSet(
        migrations_dir=directory, script_location=script_location,
        version_locations=version_locations, flat=flat, uses_own_env=uses_own_env,
        revisions=revisions, notes=tuple(notes), script_directory=script_directory)


def _revision_candidates(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return [entry for entry in path.iterdir()
            if entry.suffix == ".py" and entry.name != "__init__.py"
            and not entry.name.startswith(".")]


def _open_script_directory(directory: Path, script_location: Path,
                           version_locations: tuple[Path, ...]) -> ScriptDirectory:
    config = _alembic_config(script_location, version_locations)
    try:
        return ScriptDirectory.from_config(config)
    except CommandError as error:
        raise ConfigurationError(
            f"cannot open the migrations directory {directory}: {redact_text(str(error))}"
        ) from None


def _walk_scripts(directory: Path, script_directory: ScriptDirectory) -> Iterator[Script]:
    # Why: loading imports every revision file, so a syntax error, a missing ``revision``
    # variable or a broken down_revision chain all surface here, before any connection.
    try:
        scripts = list(script_directory.walk_revisions("base", "heads"))
    except SyntaxError as error:
        raise ConfigurationError(
            f"revision file {error.filename} in {directory} has a syntax error on line "
            f"{error.lineno}: {error.msg}") from None
    except CommandError as error:
        raise ConfigurationError(
            f"the revisions in {directory} are invalid: {redact_text(str(error))}") from None
    except Exception as error:  # a revision module may raise anything on import
        raise ConfigurationError(
            f"cannot load the revisions in {directory}: {type(error).__name__}: "
            f"{redact_text(str(error))}") from None
    if not scripts:
        raise ConfigurationError(
            f"the migrations directory {directory} contains no Alembic revisions: each file "
            "needs 'revision' and 'down_revision' variables")
    yield from scripts


def _describe_revision(script: Script) -> RevisionFile:
    path = Path(script.path)
    source = path.read_bytes()
    upgrade, downgrade = analyze_source(source.decode("utf-8", errors="replace"), path)
    description = (script.doc or "").strip().splitlines()[0] if script.doc else ""
    down_revision = script.down_revision
    if isinstance(down_revision, list):
        down_revision = tuple(down_revision)
    return RevisionFile(
        revision=script.revision, down_revision=down_revision, path=path,
        description=description, sha256=hashlib.sha256(source).hexdigest(),
        upgrade=upgrade, downgrade=downgrade)


def analyze_source(source: str, path: Path) -> tuple[CodeAnalysis, CodeAnalysis]:
    """Scan a revision's source for non-transactional steps, for upgrade and downgrade."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as error:
        raise ConfigurationError(
            f"revision file {path} has a syntax error on line {error.lineno}: {error.msg}"
        ) from None

    # Why: each direction is scanned without the other's function, so a CONCURRENTLY in
    # downgrade() does not flag the upgrade. Module-level helpers count for both.
    upgrade_nodes = [node for node in tree.body if not _is_function(node, "downgrade")]
    downgrade_nodes = [node for node in tree.body if not _is_function(node, "upgrade")]
    return _analyze_nodes(upgrade_nodes), _analyze_nodes(downgrade_nodes)


def _is_function(node: ast.stmt, name: str) -> bool:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name


def _docstring_nodes(nodes: list[ast.stmt]) -> set[int]:
    """Return the ids of string constants that are docstrings (module, function or class)."""
    found: set[int] = set()
    bodies: list[list[ast.stmt]] = [nodes]
    for node in nodes:
        for child in ast.walk(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                bodies.append(child.body)
    for body in bodies:
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            found.add(id(body[0].value))
    return found


def _analyze_nodes(nodes: list[ast.stmt]) -> CodeAnalysis:
    docstrings = _docstring_nodes(nodes)
    hazards: list[Hazard] = []
    for node in nodes:
        for child in ast.walk(node):
            if isinstance(child, ast.Attribute) and child.attr == "autocommit_block":
                hazards.append(Hazard(HazardKind.AUTOCOMMIT_BLOCK,
                                      "uses autocommit_block(), which commits mid-revision"))
            elif (isinstance(child, ast.keyword) and child.arg == "postgresql_concurrently"
                  and not (isinstance(child.value, ast.Constant) and not child.value.value)):
                hazards.append(Hazard(HazardKind.NON_TRANSACTIONAL_STATEMENT,
                                      "INDEX ... CONCURRENTLY (postgresql_concurrently=True)"))

    # Why: ast.walk is breadth-first, and the "used later" check needs source order.
    ordered = _literals_in_source_order(nodes, docstrings)
    hazards.extend(scan_sql(" ;\n".join(ordered)))
    additions = tuple(addition for text in ordered for addition in enum_additions(text))
    return CodeAnalysis(hazards=_unique(hazards), enum_additions=additions,
                        literals=tuple(ordered))


def _literals_in_source_order(nodes: list[ast.stmt], docstrings: set[int]) -> list[str]:
    found: list[tuple[int, int, str]] = []
    for node in nodes:
        for child in ast.walk(node):
            if (isinstance(child, ast.Constant) and isinstance(child.value, str)
                    and id(child) not in docstrings):
                found.append((child.lineno, child.col_offset, child.value))
    return [text for _line, _column, text in sorted(found)]


def _unique(hazards: list[Hazard]) -> tuple[Hazard, ...]:
    return tuple(dict.fromkeys(hazards))


def scan_sql(text: str) -> list[Hazard]:
    """Return the non-transactional statements found in SQL (or string literals) ``text``."""
    return [Hazard(HazardKind.NON_TRANSACTIONAL_STATEMENT, label)
            for pattern, label in _NON_TRANSACTIONAL_PATTERNS if pattern.search(text)]


def enum_additions(text: str) -> list[EnumAddition]:
    """Return the labels added by ``ALTER TYPE ... ADD VALUE`` statements in ``text``."""
    return [EnumAddition(type_name=match.group("type"),
                         value=match.group("value").replace("''", "'"))
            for match in _ADD_VALUE.finditer(text)]


def _adds_value(text: str, value: str) -> bool:
    return any(addition.value == value for addition in enum_additions(text))


def _text_after_addition(text: str, value: str) -> str:
    for match in _ADD_VALUE.finditer(text):
        if match.group("value").replace("''", "'") == value:
            return text[match.end():]
    return ""


_CREATE_ENUM = re.compile(r"\bCREATE\s+TYPE\s+(?P<type>[\w.\"]+)\s+AS\s+ENUM\b", re.IGNORECASE)


def _normalize_type_name(name: str) -> str:
    """Return the unqualified, unquoted, case-folded type name, for comparisons."""
    unqualified = name.rsplit(".", 1)[-1]
    if unqualified.startswith('"') and unqualified.endswith('"'):
        return unqualified[1:-1]
    return unqualified.lower()


def _created_enum_types(literals: tuple[str, ...]) -> set[str]:
    return {_normalize_type_name(match.group("type"))
            for text in literals for match in _CREATE_ENUM.finditer(text)}


def find_enum_uses(revisions: list[RevisionFile], *,
                   new_type_exempt: bool = False) -> dict[str, list[str]]:
    """Map each revision id to messages about enum labels it uses before they can be committed.

    A label added by ``ALTER TYPE ... ADD VALUE`` cannot be used until the adding transaction
    commits (PostgreSQL 12 and later raise SQLSTATE 55P04 otherwise), so ``revisions`` is the
    list that would share one transaction, oldest first. With ``new_type_exempt``, labels
    of a type created earlier in the same transaction count as usable, as PostgreSQL 18
    allows (PostgreSQL 15 rejects them).
    """
    found: dict[str, list[str]] = {}
    created: set[str] = set()
    for index, adding in enumerate(revisions):
        if new_type_exempt:
            created.update(_created_enum_types(adding.upgrade.literals))
        for addition in adding.upgrade.enum_additions:
            if _normalize_type_name(addition.type_name) in created:
                continue
            label = f"{addition.type_name} value '{addition.value}'"
            if adding.upgrade.uses_value(addition.value, after_addition=True):
                found.setdefault(adding.revision, []).append(
                    f"revision {adding.revision} ({adding.file_name}) adds {label} and uses it "
                    "in the same revision, so move the ADD VALUE into an earlier revision of "
                    "its own")
            for later in revisions[index + 1:]:
                if later.upgrade.uses_value(addition.value, after_addition=False):
                    found.setdefault(later.revision, []).append(
                        f"revision {later.revision} ({later.file_name}) uses {label}, which "
                        f"revision {adding.revision} adds in the same transaction")
    return found
