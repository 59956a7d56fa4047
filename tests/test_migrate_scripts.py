"""Revision directories: validation, flat and project layouts, and static hazard detection."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.migrate import load_scripts, resolve_target
from dbsync.pipeline.migrate_scripts import HazardKind, find_enum_uses
from tests.migration_fixtures import (
    SELF_CONNECTING_ENV_PY,
    make_project_dir,
    write_revision,
    write_table_chain,
)


def test_missing_directory_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigurationError, match=str(missing)):
        load_scripts(missing)


def test_empty_directory_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no revision files"):
        load_scripts(tmp_path)


def test_syntax_error_names_file(tmp_path: Path) -> None:
    write_table_chain(tmp_path, 1)
    (tmp_path / "r002.py").write_text("revision = 'r002'\ndown_revision = 'r001'\ndef upgrade(:\n")
    with pytest.raises(ConfigurationError, match=r"r002\.py"):
        load_scripts(tmp_path)


def test_file_without_revision_variable_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.py").write_text("x = 1\n")
    with pytest.raises(ConfigurationError, match="revision"):
        load_scripts(tmp_path)


def test_flat_directory_uses_dbsync_env(tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    scripts = load_scripts(tmp_path)
    assert scripts.flat
    assert scripts.uses_own_env
    assert sorted(scripts.revisions) == ["r001", "r002"]


def test_configmap_layout_loads_through_symlinks(tmp_path: Path) -> None:
    """A ConfigMap mount: files are symlinks into a hidden timestamped directory."""
    data = tmp_path / "..2026_12_04_20_00_00.000000001"
    write_table_chain(data, 2)
    (tmp_path / "..data").symlink_to(data.name)
    for name in ("r001.py", "r002.py"):
        (tmp_path / name).symlink_to(Path("..data") / name)
    scripts = load_scripts(tmp_path)
    assert sorted(scripts.revisions) == ["r001", "r002"]


def test_project_directory_uses_its_env(tmp_path: Path) -> None:
    root, versions = make_project_dir(tmp_path / "project")
    write_table_chain(versions, 1)
    scripts = load_scripts(root)
    assert not scripts.uses_own_env


def test_self_connecting_env_replaced_with_note(tmp_path: Path) -> None:
    root, versions = make_project_dir(tmp_path / "project", env_py=SELF_CONNECTING_ENV_PY)
    write_table_chain(versions, 1)
    scripts = load_scripts(root)
    assert scripts.uses_own_env
    assert any("config.attributes['connection']" in note for note in scripts.notes)


def test_checksum_is_sha256_of_file_bytes(tmp_path: Path) -> None:
    write_table_chain(tmp_path, 1)
    expected = hashlib.sha256((tmp_path / "r001.py").read_bytes()).hexdigest()
    assert load_scripts(tmp_path).revisions["r001"].sha256 == expected


@pytest.mark.parametrize(("body", "kind"), [
    (["CREATE INDEX CONCURRENTLY ix ON t (a)"], HazardKind.NON_TRANSACTIONAL_STATEMENT),
    (["drop index concurrently if exists ix"], HazardKind.NON_TRANSACTIONAL_STATEMENT),
    (["REINDEX INDEX CONCURRENTLY ix"], HazardKind.NON_TRANSACTIONAL_STATEMENT),
    (["VACUUM ANALYZE t"], HazardKind.NON_TRANSACTIONAL_STATEMENT),
    (["ALTER SYSTEM SET work_mem = '64MB'"], HazardKind.NON_TRANSACTIONAL_STATEMENT),
    (["CREATE DATABASE other"], HazardKind.NON_TRANSACTIONAL_STATEMENT),
    (["COMMIT"], HazardKind.NON_TRANSACTIONAL_STATEMENT),
    ("op.create_index('ix', 't', ['a'], postgresql_concurrently=True)",
     HazardKind.NON_TRANSACTIONAL_STATEMENT),
    ("with op.get_context().autocommit_block():\n    op.execute('SELECT 1')",
     HazardKind.AUTOCOMMIT_BLOCK),
])
def test_non_transactional_step_detected(tmp_path: Path, body: list[str] | str,
                                         kind: HazardKind) -> None:
    write_revision(tmp_path, "r001", None, body)
    analysis = load_scripts(tmp_path).revisions["r001"].upgrade
    assert kind in {hazard.kind for hazard in analysis.hazards}


def test_docstring_mention_is_not_a_hazard(tmp_path: Path) -> None:
    write_revision(tmp_path, "r001", None, ["CREATE TABLE t (a int)"],
                   description="Prepare for CREATE INDEX CONCURRENTLY and VACUUM later")
    assert load_scripts(tmp_path).revisions["r001"].upgrade.transactional


def test_plpgsql_function_is_not_a_hazard(tmp_path: Path) -> None:
    body = ("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "NEW.updated_at := now(); RETURN NEW; END; $$")
    write_revision(tmp_path, "r001", None, [body, "CREATE TEMP TABLE x (a int) ON COMMIT DROP"])
    assert load_scripts(tmp_path).revisions["r001"].upgrade.transactional


def test_downgrade_hazard_leaves_upgrade_transactional(tmp_path: Path) -> None:
    write_revision(tmp_path, "r001", None, ["CREATE TABLE t (a int)"],
                   ["DROP INDEX CONCURRENTLY ix", "DROP TABLE t"])
    revision_file = load_scripts(tmp_path).revisions["r001"]
    assert revision_file.upgrade.transactional
    assert not revision_file.downgrade.transactional


def test_enum_value_used_in_later_revision_detected(tmp_path: Path) -> None:
    write_revision(tmp_path, "r001", None, ["ALTER TYPE mood ADD VALUE 'happy'"])
    write_revision(tmp_path, "r002", "r001", ["INSERT INTO t (m) VALUES ('happy')"])
    scripts = load_scripts(tmp_path)
    uses = find_enum_uses([scripts.revisions["r001"], scripts.revisions["r002"]])
    assert list(uses) == ["r002"]


def test_enum_value_used_in_same_revision_detected(tmp_path: Path) -> None:
    write_revision(tmp_path, "r001", None, ["ALTER TYPE mood ADD VALUE IF NOT EXISTS 'happy'",
                                            "UPDATE t SET m = 'happy'"])
    uses = find_enum_uses([load_scripts(tmp_path).revisions["r001"]])
    assert list(uses) == ["r001"]


def test_enum_created_in_same_transaction_allowed(tmp_path: Path) -> None:
    """PostgreSQL 18 accepts a new label when the type was created in the same transaction."""
    write_revision(tmp_path, "r001", None, ["CREATE TYPE public.mood AS ENUM ('sad')"])
    write_revision(tmp_path, "r002", "r001", ["ALTER TYPE mood ADD VALUE 'happy'"])
    write_revision(tmp_path, "r003", "r002", ["INSERT INTO t (m) VALUES ('happy')"])
    scripts = load_scripts(tmp_path)
    shared = [scripts.revisions[revision] for revision in ("r001", "r002", "r003")]
    assert find_enum_uses(shared, new_type_exempt=True) == {}
    assert list(find_enum_uses(shared, new_type_exempt=False)) == ["r003"]


def test_enum_value_not_used_is_no_hazard(tmp_path: Path) -> None:
    write_revision(tmp_path, "r001", None, ["ALTER TYPE mood ADD VALUE 'happy'"])
    write_revision(tmp_path, "r002", "r001", ["INSERT INTO t (m) VALUES ('sad')"])
    scripts = load_scripts(tmp_path)
    assert find_enum_uses([scripts.revisions["r001"], scripts.revisions["r002"]]) == {}


def test_resolve_head(tmp_path: Path) -> None:
    write_table_chain(tmp_path, 3)
    assert resolve_target(load_scripts(tmp_path), "head", source_dsn=None) == "r003"


def test_resolve_revision_prefix(tmp_path: Path) -> None:
    write_revision(tmp_path, "a1b2c3d4", None, ["SELECT 1"])
    assert resolve_target(load_scripts(tmp_path), "a1b2", source_dsn=None) == "a1b2c3d4"


def test_resolve_unknown_revision_rejected(tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    with pytest.raises(ConfigurationError, match="'r999' is not in"):
        resolve_target(load_scripts(tmp_path), "r999", source_dsn=None)


def test_resolve_head_with_two_heads_rejected(tmp_path: Path) -> None:
    write_revision(tmp_path, "r001", None, ["SELECT 1"])
    write_revision(tmp_path, "r002", "r001", ["SELECT 2"])
    write_revision(tmp_path, "r003", "r001", ["SELECT 3"])
    with pytest.raises(ConfigurationError, match="several heads"):
        resolve_target(load_scripts(tmp_path), "head", source_dsn=None)


def test_resolve_source_without_source_dsn_rejected(tmp_path: Path) -> None:
    write_table_chain(tmp_path, 1)
    with pytest.raises(ConfigurationError, match="source"):
        resolve_target(load_scripts(tmp_path), "source", source_dsn=None)
