"""Resolving Secret and ConfigMap references through the API (the emulator) into DSNs."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import kopf
import pytest
from psycopg.conninfo import conninfo_to_dict

from dbsync.k8s import kubeclient
from dbsync.k8s.credentials import CONFIG_MAP, SECRET, referenced_objects, resolve_inputs
from dbsync.k8s.models import parse_spec
from dbsync.pipeline.errors import ConfigurationError
from dbsync.testing.kubeapi import KubeApiServer
from tests.kubeapi_client import client_for
from tests.kubeapi_fixtures import kubeapi  # noqa: F401

PASSWORD = "p'w d\\x"  # quote, space and backslash must survive conninfo quoting


def _create(server: KubeApiServer, plural: str, body: dict[str, Any]) -> None:
    reply = client_for(server).call("POST", f"/api/v1/namespaces/default/{plural}", body)
    assert reply.status == 201, reply.body


def _secret(server: KubeApiServer, name: str, data: dict[str, str]) -> None:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    _create(server, "secrets", {"apiVersion": "v1", "kind": "Secret",
                                "metadata": {"name": name}, "data": encoded})


def _resolve(server: KubeApiServer, spec: dict[str, Any], workdir: Path) -> Any:
    kubeclient.remember_connection(kopf.ConnectionInfo(server=server.url, scheme="Bearer",
                                                       token="test"))

    async def resolve() -> Any:
        client = kubeclient.KubeClient()
        try:
            return await resolve_inputs(parse_spec(spec), namespace="default", reader=client,
                                        workdir=workdir)
        finally:
            await client.close()

    return asyncio.run(resolve())


SPEC: dict[str, Any] = {
    "source": {"uriFrom": {"secretKeyRef": {"name": "source-db", "key": "uri"}}},
    "target": {"host": "db.example", "port": 6543, "database": "payments", "user": "sync",
               "passwordFrom": {"secretKeyRef": {"name": "target-db", "key": "password"}},
               "sslMode": "verify-full",
               "caCertFrom": {"secretKeyRef": {"name": "target-db", "key": "ca.crt"}}},
    "migrations": {"configMaps": [{"name": "revisions"}]},
}


def test_references_resolve_to_dsns_and_files(kubeapi: KubeApiServer,  # noqa: F811
                                              tmp_path: Path) -> None:
    _secret(kubeapi, "source-db", {"uri": "postgresql://u:secret@src.example:5432/app"})
    _secret(kubeapi, "target-db", {"password": PASSWORD, "ca.crt": "-----CA-----\n"})
    _create(kubeapi, "configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                    "metadata": {"name": "revisions"},
                                    "data": {"0001_a.py": "revision = 'a'\n",
                                             "README.md": "not a revision"}})

    inputs = _resolve(kubeapi, SPEC, tmp_path)
    target = conninfo_to_dict(inputs.target_dsn)

    assert inputs.source_dsn == "postgresql://u:secret@src.example:5432/app"
    assert target["password"] == PASSWORD
    assert (target["host"], target["port"], target["dbname"]) == ("db.example", "6543",
                                                                  "payments")
    assert target["sslmode"] == "verify-full"
    assert Path(str(target["sslrootcert"])).read_text() == "-----CA-----\n"
    assert Path(str(target["sslrootcert"])).stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in inputs.migrations_dir.iterdir()) == ["0001_a.py"]
    assert PASSWORD in inputs.secrets


def test_missing_secret_names_it(kubeapi: KubeApiServer, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ConfigurationError, match="default/source-db not found") as raised:
        _resolve(kubeapi, SPEC, tmp_path)
    assert raised.value.reason == "CredentialsNotFound"


def test_missing_key_names_it(kubeapi: KubeApiServer, tmp_path: Path) -> None:  # noqa: F811
    _secret(kubeapi, "source-db", {"url": "typo"})
    with pytest.raises(ConfigurationError, match="has no key 'uri'") as raised:
        _resolve(kubeapi, SPEC, tmp_path)
    assert raised.value.reason == "CredentialsNotFound"


def test_referenced_objects_lists_secrets_and_configmaps() -> None:
    assert referenced_objects(parse_spec(SPEC)) == frozenset({
        (SECRET, "source-db"), (SECRET, "target-db"), (CONFIG_MAP, "revisions")})


def test_missing_fields_finds_dropped_status_fields() -> None:
    sent = {"drift": {"inSync": True, "extra": 1}, "ledger": None, "failures": 0}
    stored = {"drift": {"inSync": True}, "failures": 0}
    assert kubeclient.missing_fields(sent, stored) == ["status.drift.extra"]
