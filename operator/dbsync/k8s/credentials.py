"""Resolve a DatabaseSync's Secret and ConfigMap references into what one sync needs.

DSNs are built in memory and handed to the sync's child process on standard input; they
are never logged, stored in status or written to disk.  Files that libpq and Alembic must
read (a CA bundle, revision files from ConfigMaps) go into a private temporary directory
that the caller deletes when the child has exited.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from dbsync.k8s.conditions import Reason
from dbsync.k8s.models import (
    AuditDestination,
    DatabaseReference,
    DatabaseSyncSpec,
    SecretKeySelector,
    StringValueSource,
)
from dbsync.pipeline.errors import ConfigurationError

logger = logging.getLogger("dbsync.k8s.credentials")

SECRET = "Secret"  # noqa: S105 - a kind name, not a password
CONFIG_MAP = "ConfigMap"


class ObjectReader(Protocol):
    """Reads Secrets and ConfigMaps of the resource's namespace."""

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True, kw_only=True)
class ResolvedInputs:
    """Connection strings and files for one sync; ``secrets`` lists values to redact."""

    source_dsn: str
    target_dsn: str
    audit_dsn: str | None
    migrations_dir: Path | None
    secrets: tuple[str, ...]


def referenced_objects(spec: DatabaseSyncSpec) -> frozenset[tuple[str, str]]:
    """Return ``(kind, name)`` of every Secret and ConfigMap ``spec`` reads."""
    references: set[tuple[str, str]] = set()
    databases = [spec.source, spec.target]
    if spec.audit.database is not None:
        databases.append(spec.audit.database)
    for database in databases:
        for selector in (database.uri_from, database.password_from, database.ca_cert_from):
            if selector is not None:
                references.add((SECRET, selector.secret_key_ref.name))
        user_from = database.user_from
        if user_from is not None and user_from.secret_key_ref is not None:
            references.add((SECRET, user_from.secret_key_ref.name))
        if user_from is not None and user_from.config_map_key_ref is not None:
            references.add((CONFIG_MAP, user_from.config_map_key_ref.name))
    if spec.migrations is not None:
        for config_map in spec.migrations.config_maps or ():
            references.add((CONFIG_MAP, config_map.name))
    return frozenset(references)


def _quote_conninfo(value: str) -> str:
    """Quote a libpq keyword/value parameter so spaces, quotes and backslashes survive."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _object_data(body: dict[str, Any], key: str, *, encoded: bool) -> str | None:
    data = body.get("data") or {}
    if key in data:
        if not encoded:
            return str(data[key])
        try:
            return base64.b64decode(data[key], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None

    # stringData is write-only on a real API server, but an emulator may return it.
    string_data = body.get("stringData") or {}
    if key in string_data:
        return str(string_data[key])
    return None


class _Resolver:
    """Reads each referenced object once per sync."""

    def __init__(self, *, namespace: str, reader: ObjectReader, workdir: Path) -> None:
        self.namespace = namespace
        self.reader = reader
        self.workdir = workdir
        self.secrets: list[str] = []
        self._cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    async def _object(self, kind: str, name: str) -> dict[str, Any] | None:
        if (kind, name) not in self._cache:
            if kind == SECRET:
                body = await self.reader.read_secret(self.namespace, name)
            else:
                body = await self.reader.read_config_map(self.namespace, name)
            self._cache[(kind, name)] = body
        return self._cache[(kind, name)]

    async def secret_value(self, selector: SecretKeySelector, *, field_path: str,
                           sensitive: bool = True) -> str:
        body = await self._object(SECRET, selector.name)
        if body is None:
            raise ConfigurationError(
                f"Secret {self.namespace}/{selector.name} not found (referenced by "
                f"{field_path}): create it or correct the reference",
                reason=Reason.CREDENTIALS_NOT_FOUND)
        value = _object_data(body, selector.key, encoded=True)
        if value is None:
            raise ConfigurationError(
                f"Secret {self.namespace}/{selector.name} has no key {selector.key!r} "
                f"(referenced by {field_path}): add the key or correct the reference",
                reason=Reason.CREDENTIALS_NOT_FOUND)
        if sensitive:
            self.secrets.append(value)
        return value

    async def config_map_value(self, name: str, key: str, *, field_path: str) -> str:
        body = await self._object(CONFIG_MAP, name)
        if body is None:
            raise ConfigurationError(
                f"ConfigMap {self.namespace}/{name} not found (referenced by {field_path}): "
                "create it or correct the reference", reason=Reason.CONFIG_MAP_NOT_FOUND)
        value = _object_data(body, key, encoded=False)
        if value is None:
            raise ConfigurationError(
                f"ConfigMap {self.namespace}/{name} has no key {key!r} (referenced by "
                f"{field_path}): add the key or correct the reference",
                reason=Reason.CONFIG_MAP_NOT_FOUND)
        return value

    async def string_value(self, source: StringValueSource, *, field_path: str) -> str:
        if source.value is not None:
            return source.value
        if source.secret_key_ref is not None:
            return await self.secret_value(source.secret_key_ref, field_path=field_path,
                                           sensitive=False)
        assert source.config_map_key_ref is not None  # guaranteed by the model's validator
        selector = source.config_map_key_ref
        return await self.config_map_value(selector.name, selector.key, field_path=field_path)

    async def dsn(self, database: DatabaseReference, *, role: str) -> str:
        """Build a libpq connection string for ``database``."""
        ssl_parameters: dict[str, str] = {}
        if database.ssl_mode is not None:
            ssl_parameters["sslmode"] = database.ssl_mode.value
        if database.ca_cert_from is not None:
            bundle = await self.secret_value(database.ca_cert_from.secret_key_ref,
                                             field_path=f"spec.{role}.caCertFrom",
                                             sensitive=False)
            ca_path = self.workdir / f"{role}-ca.crt"
            ca_path.write_text(bundle, encoding="utf-8")
            ca_path.chmod(0o600)
            ssl_parameters["sslrootcert"] = str(ca_path)

        if database.uri_from is not None:
            uri = await self.secret_value(database.uri_from.secret_key_ref,
                                          field_path=f"spec.{role}.uriFrom")
            if not ssl_parameters:
                return uri
            separator = "&" if "?" in uri else "?"
            return uri + separator + urlencode(ssl_parameters)

        parameters: dict[str, str] = {
            "host": database.host or "",
            "port": str(database.port),
            "dbname": database.database or "",
        }
        if database.user is not None:
            parameters["user"] = database.user
        elif database.user_from is not None:
            parameters["user"] = await self.string_value(database.user_from,
                                                         field_path=f"spec.{role}.userFrom")
        if database.password_from is not None:
            parameters["password"] = await self.secret_value(
                database.password_from.secret_key_ref, field_path=f"spec.{role}.passwordFrom")
        parameters.update(ssl_parameters)
        return " ".join(f"{key}={_quote_conninfo(value)}" for key, value in parameters.items())

    async def migrations_dir(self, spec: DatabaseSyncSpec) -> Path | None:
        """Return the revision directory, writing ConfigMap revision files when needed."""
        if spec.migrations is None:
            return None
        if spec.migrations.path is not None:
            return Path(spec.migrations.path)

        directory = self.workdir / "migrations"
        directory.mkdir(mode=0o700)
        written = 0
        for index, source in enumerate(spec.migrations.config_maps or ()):
            field_path = f"spec.migrations.configMaps[{index}]"
            if source.key is not None:
                content = await self.config_map_value(source.name, source.key,
                                                      field_path=field_path)
                written += _write_revision(directory, source.key, content,
                                           origin=f"ConfigMap {source.name}")
                continue
            body = await self._object(CONFIG_MAP, source.name)
            if body is None:
                raise ConfigurationError(
                    f"ConfigMap {self.namespace}/{source.name} not found (referenced by "
                    f"{field_path}): create it or correct the reference",
                    reason=Reason.CONFIG_MAP_NOT_FOUND)
            for key, content in sorted((body.get("data") or {}).items()):
                if key.endswith(".py"):
                    written += _write_revision(directory, key, str(content),
                                               origin=f"ConfigMap {source.name}")
        if written == 0:
            raise ConfigurationError(
                "the ConfigMaps in spec.migrations.configMaps hold no revision files: add "
                "keys ending in .py, or name one with key", reason=Reason.INVALID_SPEC)
        return directory


def _write_revision(directory: Path, key: str, content: str, *, origin: str) -> int:
    # Data keys cannot contain '/', but '.' and '..' are valid keys and must not escape.
    if key in (".", "..") or "/" in key:
        raise ConfigurationError(f"{origin} key {key!r} is not a usable file name: rename it",
                                 reason=Reason.INVALID_SPEC)
    target = directory / key
    if target.exists():
        raise ConfigurationError(
            f"revision file {key} comes from more than one ConfigMap ({origin} repeats it): "
            "keep each file name in one ConfigMap", reason=Reason.INVALID_SPEC)
    target.write_text(content, encoding="utf-8")
    return 1


async def resolve_inputs(spec: DatabaseSyncSpec, *, namespace: str, reader: ObjectReader,
                         workdir: Path) -> ResolvedInputs:
    """Read every referenced Secret and ConfigMap and return DSNs and the revision directory.

    Raises ConfigurationError with reason CredentialsNotFound (missing Secret or key),
    ConfigMapNotFound or InvalidSpec.  ``workdir`` must be a private directory.
    """
    resolver = _Resolver(namespace=namespace, reader=reader, workdir=workdir)
    source_dsn = await resolver.dsn(spec.source, role="source")
    target_dsn = await resolver.dsn(spec.target, role="target")
    audit_dsn: str | None = None
    if spec.audit.destination is AuditDestination.DATABASE and spec.audit.database is not None:
        audit_dsn = await resolver.dsn(spec.audit.database, role="audit")
    migrations_dir = await resolver.migrations_dir(spec)
    return ResolvedInputs(
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        audit_dsn=audit_dsn,
        migrations_dir=migrations_dir,
        secrets=tuple(secret for secret in resolver.secrets if secret),
    )
