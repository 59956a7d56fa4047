"""The sync request: every input of one sync, as the CLI builds it or the operator sends it.

The operator feeds this model as JSON on a child process's standard input, so credentials
never appear on a command line.  Field names are snake_case; the custom resource's
camelCase spec is translated by the operator.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dbsync.pipeline.ledger import LedgerConfig
from dbsync.pipeline.migrate import DryRunMode, TransactionMode


class DiffRequest(BaseModel):
    """Ignore rules for the schema diff."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ignore_schemas: tuple[str, ...] = ()
    ignore_patterns: tuple[str, ...] = ()
    ignore_kinds: tuple[str, ...] = ()


class RequesterRequest(BaseModel):
    """Who asked for the sync: a CLI user or a Kubernetes resource."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = "cli"
    user: str | None = None
    host: str | None = None
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None
    generation: int | None = None


class SyncRequest(BaseModel):
    """All inputs of one sync run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_dsn: str = Field(min_length=1)
    target_dsn: str = Field(min_length=1)
    migrations_dir: Path | None = None
    revision: str = Field(default="head", min_length=1, max_length=255)
    transaction_mode: TransactionMode = TransactionMode.ALL
    dry_run: DryRunMode = DryRunMode.OFF
    run_migrations: bool = True
    allow_downgrade: bool = False
    lock_wait_seconds: float = Field(default=60.0, ge=0, le=86_400)
    lock_timeout_ms: int | None = Field(default=None, ge=1, le=3_600_000)
    statement_timeout_ms: int | None = Field(default=None, ge=1, le=86_400_000)
    connect_timeout_seconds: int = Field(default=10, ge=1, le=600)
    diff: DiffRequest = DiffRequest()
    ledger: LedgerConfig | None = None
    audit_dsn: str | None = None
    requester: RequesterRequest | None = None
    approver: str | None = None
    traceparent: str | None = None
    sync_id: uuid.UUID | None = None
    approved_plan: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("revision")
    @classmethod
    def _revision_is_a_word(cls, value: str) -> str:
        if any(character.isspace() for character in value):
            raise ValueError(
                f"revision {value!r} contains whitespace: use head, source or a revision id")
        return value
