"""The sync request: every input of one sync, as the CLI builds it or the operator sends it.

The operator feeds this model as JSON on a child process's standard input, so credentials
never appear on a command line.  Field names are snake_case; the custom resource's
camelCase spec is translated by the operator.

A sync Job's request carries no credentials at all: ``source_env``, ``target_env`` and
``audit_env`` name the environment variables (set from Secrets by the kubelet) from which
:func:`resolve_environment_dsns` assembles each DSN inside the pod.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.ledger import LedgerConfig
from dbsync.pipeline.migrate import DryRunMode, TransactionMode


class DiffRequest(BaseModel):
    """Ignore rules for the schema diff."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ignore_schemas: tuple[str, ...] = ()
    ignore_patterns: tuple[str, ...] = ()
    ignore_kinds: tuple[str, ...] = ()


class RequesterRequest(BaseModel):
    """Requester of the sync: a CLI user or a Kubernetes resource."""

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
    # Switches and numbers are strict: a request file's "yes" or "60" is an error rather
    # than a guess, which matters most for allow_downgrade.
    run_migrations: StrictBool = True
    allow_downgrade: StrictBool = False
    lock_wait_seconds: Annotated[float, Strict()] = Field(default=60.0, ge=0, le=86_400)
    lock_timeout_ms: StrictInt | None = Field(default=None, ge=1, le=3_600_000)
    statement_timeout_ms: StrictInt | None = Field(default=None, ge=1, le=86_400_000)
    connect_timeout_seconds: StrictInt = Field(default=10, ge=1, le=600)
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


ENVIRONMENT_VARIABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

# Request keys that name environment variables, and the DSN field each one fills.
DSN_ENVIRONMENT_FIELDS = {"source_env": "source_dsn", "target_env": "target_dsn",
                          "audit_env": "audit_dsn"}


class DatabaseEnvironment(BaseModel):
    """One database's connection details with every secret part named by an environment variable.

    Either ``uri_variable`` (a variable holding a whole ``postgresql://`` URI) or ``host``
    and ``database``.  The login name is ``user`` or the value of ``user_variable``, and the
    password is the value of ``password_variable``.  ``ssl_root_cert`` is a file path.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri_variable: str | None = Field(default=None, pattern=ENVIRONMENT_VARIABLE_PATTERN)
    host: str | None = Field(default=None, min_length=1)
    port: int = Field(default=5432, ge=1, le=65535)
    database: str | None = Field(default=None, min_length=1)
    user: str | None = Field(default=None, min_length=1)
    user_variable: str | None = Field(default=None, pattern=ENVIRONMENT_VARIABLE_PATTERN)
    password_variable: str | None = Field(default=None, pattern=ENVIRONMENT_VARIABLE_PATTERN)
    ssl_mode: str | None = None
    ssl_root_cert: str | None = None

    def dsn(self, environ: Mapping[str, str], *, role: str) -> str:
        """Assemble the DSN from ``environ``; raise ConfigurationError naming a missing variable."""
        ssl_parameters = {key: value for key, value in (("sslmode", self.ssl_mode),
                                                         ("sslrootcert", self.ssl_root_cert))
                          if value is not None}
        if self.uri_variable is not None:
            uri = _variable(environ, self.uri_variable, role=role)
            if not ssl_parameters:
                return uri
            separator = "&" if "?" in uri else "?"
            return uri + separator + urlencode(ssl_parameters)

        if self.host is None or self.database is None:
            raise ConfigurationError(
                f"the {role} database's environment form has neither uri_variable nor host "
                "and database: set one of them")
        parameters = {"host": self.host, "port": str(self.port), "dbname": self.database}
        if self.user is not None:
            parameters["user"] = self.user
        elif self.user_variable is not None:
            parameters["user"] = _variable(environ, self.user_variable, role=role)
        if self.password_variable is not None:
            parameters["password"] = _variable(environ, self.password_variable, role=role)
        parameters.update(ssl_parameters)
        return " ".join(f"{key}={_quote_conninfo(value)}" for key, value in parameters.items())


def _variable(environ: Mapping[str, str], name: str, *, role: str) -> str:
    value = environ.get(name)
    if not value:
        raise ConfigurationError(
            f"environment variable {name} for the {role} database is not set or empty: set "
            "it, for example from a Secret with valueFrom.secretKeyRef")
    return value


def _quote_conninfo(value: str) -> str:
    # libpq keyword/value syntax: single quotes, with backslash escaping quotes and backslashes.
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def resolve_environment_dsns(fields: Mapping[str, Any],
                             environ: Mapping[str, str]) -> dict[str, Any]:
    """Replace ``source_env``, ``target_env`` and ``audit_env`` by DSNs built from ``environ``.

    A request may give a database either as a DSN or in the environment form, not both.
    """
    resolved = dict(fields)
    for env_key, dsn_key in DSN_ENVIRONMENT_FIELDS.items():
        form = resolved.pop(env_key, None)
        if form is None:
            continue
        if resolved.get(dsn_key):
            raise ConfigurationError(f"the request sets both {dsn_key} and {env_key}: keep one")
        try:
            database = DatabaseEnvironment.model_validate(form)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
                                 for item in error.errors())
            raise ConfigurationError(f"invalid {env_key} in the request: {problems}") from None
        resolved[dsn_key] = database.dsn(environ, role=env_key.removesuffix("_env"))
    return resolved
