"""Build the ``batch/v1`` Job that runs one sync, and the credential-free request it reads.

The Job carries no secret value: database URIs, user names and passwords reach the pod as
``valueFrom.secretKeyRef`` environment variables, which the kubelet resolves, and the
request JSON names those variables (see ``dbsync.pipeline.request.DatabaseEnvironment``).
Each sync gets its own Job, named from the resource and the sync id, because a Job's pod
template cannot be changed after creation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dbsync.k8s.models import API_VERSION, KIND, DatabaseReference, DatabaseSyncSpec
from dbsync.pipeline.termination import (
    DEFAULT_TERMINATION_MESSAGE_PATH,
    TERMINATION_MESSAGE_PATH_VARIABLE,
)

# Labels that find a resource's Jobs; a restarted operator looks its Job up by both.
RESOURCE_UID_LABEL = "dbsync.io/resource-uid"
SYNC_ID_LABEL = "dbsync.io/sync-id"
COMPONENT_LABELS = {"app.kubernetes.io/name": "dbsync-sync",
                    "app.kubernetes.io/managed-by": "dbsync-operator"}

REQUEST_VARIABLE = "DBSYNC_REQUEST"
SYNC_CONTAINER = "sync"
COPY_CONTAINER = "copy-migrations"
MIGRATIONS_MOUNT = "/var/run/dbsync/migrations"
CA_MOUNT_ROOT = "/var/run/dbsync/ca"
# An emptyDir volume in the pod, not the node's /tmp: the root filesystem is read-only.
TMP_MOUNT = "/tmp"  # noqa: S108

# Kubernetes limits a Job's name to 63 characters, since its pods' labels repeat it.
MAX_JOB_NAME_CHARACTERS = 63
SYNC_ID_CHARACTERS = 8

# The user of dbsync's image ("nonroot" in distroless images).
RUN_AS_USER = 65532

_DATABASE_ROLES = ("source", "target", "audit")


class JobPurpose(StrEnum):
    """Purpose of a Job's pod: a sync (``dbsync run``) or a plan (``dbsync plan``)."""

    SYNC = "sync"
    PLAN = "plan"


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """Operator-wide settings of sync Jobs (``dbsync operator --job-*`` options)."""

    image: str = "dbsync-operator:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_account: str = "dbsync-sync-runner"
    ttl_seconds_after_finished: int = 3600
    cpu_request: str = "100m"
    cpu_limit: str = "1"
    memory_request: str = "256Mi"
    memory_limit: str = "512Mi"
    poll_interval_seconds: float = 1.0


def job_name(resource_name: str, sync_id: str, purpose: JobPurpose = JobPurpose.SYNC) -> str:
    """Return ``<resource>-<purpose>-<first 8 hex digits of the sync id>``, at most 63 characters.

    The purpose is ``sync`` or ``plan``.  A plan gets its own sync id, so its Job never takes
    the name of a sync's Job.
    """
    suffix = f"-{purpose.value}-" + sync_id.replace("-", "")[:SYNC_ID_CHARACTERS]

    # Resource names may contain dots, which a DNS label (the pod's hostname) may not.
    prefix = re.sub(r"[^a-z0-9-]", "-", resource_name.lower())
    prefix = prefix[:MAX_JOB_NAME_CHARACTERS - len(suffix)].rstrip("-") or "dbsync"
    return prefix + suffix


def job_labels(*, uid: str, sync_id: str) -> dict[str, str]:
    """Return the labels of a sync's Job and pod."""
    return {**COMPONENT_LABELS, RESOURCE_UID_LABEL: uid, SYNC_ID_LABEL: sync_id}


def _variable(role: str, part: str) -> str:
    return f"DBSYNC_{role.upper()}_{part}"


def _database_environment(database: DatabaseReference, *,
                          role: str) -> tuple[dict[str, Any], list[dict[str, Any]],
                                              list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the request's environment form, env entries, volumes and mounts for a database."""
    form: dict[str, Any] = {}
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []

    if database.ssl_mode is not None:
        form["ssl_mode"] = database.ssl_mode.value
    if database.ca_cert_from is not None:
        selector = database.ca_cert_from.secret_key_ref
        volume = f"{role}-ca"
        directory = f"{CA_MOUNT_ROOT}/{role}"
        volumes.append({"name": volume, "secret": {
            "secretName": selector.name, "items": [{"key": selector.key, "path": "ca.crt"}],
            "defaultMode": 0o440}})
        mounts.append({"name": volume, "mountPath": directory, "readOnly": True})
        form["ssl_root_cert"] = f"{directory}/ca.crt"

    if database.uri_from is not None:
        selector = database.uri_from.secret_key_ref
        form["uri_variable"] = _variable(role, "URI")
        env.append({"name": form["uri_variable"], "valueFrom": {"secretKeyRef": {
            "name": selector.name, "key": selector.key}}})
        return form, env, volumes, mounts

    form.update({"host": database.host, "port": database.port, "database": database.database})
    if database.user is not None:
        form["user"] = database.user
    elif database.user_from is not None:
        source = database.user_from
        form["user_variable"] = _variable(role, "USER")
        if source.value is not None:
            env.append({"name": form["user_variable"], "value": source.value})
        elif source.secret_key_ref is not None:
            env.append({"name": form["user_variable"], "valueFrom": {"secretKeyRef": {
                "name": source.secret_key_ref.name, "key": source.secret_key_ref.key}}})
        elif source.config_map_key_ref is not None:
            env.append({"name": form["user_variable"], "valueFrom": {"configMapKeyRef": {
                "name": source.config_map_key_ref.name,
                "key": source.config_map_key_ref.key}}})
    if database.password_from is not None:
        selector = database.password_from.secret_key_ref
        form["password_variable"] = _variable(role, "PASSWORD")
        env.append({"name": form["password_variable"], "valueFrom": {"secretKeyRef": {
            "name": selector.name, "key": selector.key}}})
    return form, env, volumes, mounts


@dataclass(frozen=True, kw_only=True)
class MigrationsLayout:
    """Layout of the revision files in the pod: volumes, mounts, an init container, the path."""

    directory: str | None
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    init_containers: tuple[dict[str, Any], ...] = ()
    image: str | None = None


def migrations_layout(spec: DatabaseSyncSpec, *, revision_keys: Mapping[str, Sequence[str]],
                      container_defaults: Mapping[str, Any]) -> MigrationsLayout:
    """Return how the revision files reach the sync container.

    ``revision_keys`` maps each migrations ConfigMap to the keys to project (its ``*.py``
    keys, or the one ``key`` the spec names).
    """
    migrations = spec.migrations
    if migrations is None:
        return MigrationsLayout(directory=None)

    if migrations.config_maps is not None:
        sources = [{"configMap": {"name": source.name, "items": [
            {"key": key, "path": key} for key in revision_keys.get(source.name, ())]}}
            for source in migrations.config_maps]
        volume = {"name": "migrations", "projected": {"sources": sources, "defaultMode": 0o444}}
        mount = {"name": "migrations", "mountPath": MIGRATIONS_MOUNT, "readOnly": True}
        return MigrationsLayout(directory=MIGRATIONS_MOUNT, volumes=(volume,), mounts=(mount,))

    assert migrations.path is not None  # guaranteed by MigrationsSource's validator
    if migrations.image is None:
        return MigrationsLayout(directory=migrations.path)
    if migrations.run_in_image:
        return MigrationsLayout(directory=migrations.path, image=migrations.image)

    # dbsync's own image runs the sync; an init container copies the revision directory out
    # of the application's image into a volume both containers share.
    volume = {"name": "migrations", "emptyDir": {"sizeLimit": "64Mi"}}
    copy_container = {
        **container_defaults,
        "name": COPY_CONTAINER,
        "image": migrations.image,
        "command": ["cp", "-R", migrations.path.rstrip("/") + "/.", MIGRATIONS_MOUNT],
        "volumeMounts": [{"name": "migrations", "mountPath": MIGRATIONS_MOUNT}],
    }
    mount = {"name": "migrations", "mountPath": MIGRATIONS_MOUNT, "readOnly": True}
    return MigrationsLayout(directory=MIGRATIONS_MOUNT, volumes=(volume,), mounts=(mount,),
                            init_containers=(copy_container,))


def pod_request(request: Mapping[str, Any], *, environment_forms: Mapping[str, Any],
                migrations_dir: str | None) -> dict[str, Any]:
    """Return ``request`` without DSNs: the environment forms replace them."""
    stripped = {key: value for key, value in request.items()
                if key not in ("source_dsn", "target_dsn", "audit_dsn", "migrations_dir")}
    stripped.update(environment_forms)
    stripped["migrations_dir"] = migrations_dir
    return stripped


def build_job(*, body: Mapping[str, Any], spec: DatabaseSyncSpec, request: Mapping[str, Any],
              sync_id: str, settings: JobSettings,
              revision_keys: Mapping[str, Sequence[str]],
              purpose: JobPurpose = JobPurpose.SYNC) -> dict[str, Any]:
    """Return the Job manifest for one sync (or one plan) of ``body``."""
    metadata = body.get("metadata") or {}
    name = str(metadata.get("name"))
    uid = str(metadata.get("uid"))
    labels = job_labels(uid=uid, sync_id=sync_id)

    resources = {"requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
                 "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit}}
    container_security = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container_defaults = {"imagePullPolicy": settings.image_pull_policy,
                          "resources": resources, "securityContext": container_security}

    forms: dict[str, Any] = {}
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_MOUNT}]
    databases = {"source": spec.source, "target": spec.target, "audit": spec.audit.database}
    for role in _DATABASE_ROLES:
        database = databases[role]
        if database is None:
            continue
        form, role_env, role_volumes, role_mounts = _database_environment(database, role=role)
        forms[f"{role}_env"] = form
        env.extend(role_env)
        volumes.extend(role_volumes)
        mounts.extend(role_mounts)

    layout = migrations_layout(spec, revision_keys=revision_keys,
                               container_defaults=container_defaults)
    volumes.extend(layout.volumes)
    mounts.extend(layout.mounts)
    payload = pod_request(request, environment_forms=forms, migrations_dir=layout.directory)
    env = [
        {"name": REQUEST_VARIABLE, "value": json.dumps(payload, default=str,
                                                       separators=(",", ":"))},
        {"name": TERMINATION_MESSAGE_PATH_VARIABLE, "value": DEFAULT_TERMINATION_MESSAGE_PATH},
        {"name": "TMPDIR", "value": TMP_MOUNT},
        {"name": "HOME", "value": TMP_MOUNT},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        *env,
    ]

    container = {
        **container_defaults,
        "name": SYNC_CONTAINER,
        "image": layout.image or settings.image,
        "command": ["dbsync"],
        "args": ["run" if purpose is JobPurpose.SYNC else "plan", "--config-env",
                 REQUEST_VARIABLE, "--output", "json"],
        "env": env,
        "volumeMounts": mounts,
        "terminationMessagePath": DEFAULT_TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER,
                            "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if layout.init_containers:
        pod_spec["initContainers"] = list(layout.init_containers)

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, sync_id, purpose),
            "namespace": metadata.get("namespace"),
            "labels": labels,
            "annotations": {"dbsync.io/resource-name": name},
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": KIND, "name": name,
                                 "uid": uid, "controller": True}],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": spec.sync_timeout_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
