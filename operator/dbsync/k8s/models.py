"""The DatabaseSync custom resource as pydantic models: the single source of its schema.

:mod:`dbsync.k8s.crd` turns these models into the CustomResourceDefinition, and the
operator parses every resource it handles with them, so the API server's validation and
the operator's own checks agree on every object the schema accepts. The models are more
lenient in one place: they coerce strings such as "5" to integers, which the schema
rejects before the operator sees them. Field names are camelCase on the wire (aliases)
and snake_case in Python.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from dbsync.pipeline.ledger_config import LedgerConfig
from dbsync.pipeline.migrate_model import DryRunMode, TransactionMode

GROUP = "dbsync.io"
VERSION = "v1alpha1"
KIND = "DatabaseSync"
PLURAL = "databasesyncs"
SINGULAR = "databasesync"
SHORT_NAMES = ("dbsync", "dbsyncs")
CATEGORIES = ("dbsync",)
API_VERSION = f"{GROUP}/{VERSION}"

# Annotation that requests a run now. Its value is echoed in status.lastHandledRunAt.
RUN_AT_ANNOTATION = f"{GROUP}/run-at"

# Annotations that approve a pending plan by its hash, and name who approved it.
APPROVED_PLAN_ANNOTATION = f"{GROUP}/approved-plan"
APPROVED_BY_ANNOTATION = f"{GROUP}/approved-by"

# A plan hash: SHA-256 in lowercase hex, as `dbsync plan` prints it.
PLAN_HASH_PATTERN = r"^[0-9a-f]{64}$"

# Kubernetes object names (DNS subdomain) and data keys of Secrets and ConfigMaps.
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"

# A Go-style duration made of whole units, for example 30s, 5m or 1h30m.
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"

# head, source, or an Alembic revision id.
REVISION_PATTERN = r"^[A-Za-z0-9_]{1,128}$"

HOST_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9.:\[\]]*[A-Za-z0-9\]])?$"

# A container image reference: registry/name, then an optional :tag and @digest.
IMAGE_PATTERN = r"^[a-z0-9]([-a-z0-9._/:]*[a-z0-9])?(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$"


class _Model(BaseModel):
    """Base of every resource model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
    )


class SecretKeySelector(_Model):
    """One key of a Secret in the resource's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN,
                      description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, pattern=DATA_KEY_PATTERN,
                     description="Key in the Secret's data.")


class SecretValueSource(_Model):
    """A value read from a Secret, so it never appears in the resource itself."""

    secret_key_ref: SecretKeySelector = Field(description="The Secret key holding the value.")


class ConfigMapKeySelector(_Model):
    """One key of a ConfigMap in the resource's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN,
                      description="Name of the ConfigMap.")
    key: str = Field(min_length=1, max_length=253, pattern=DATA_KEY_PATTERN,
                     description="Key in the ConfigMap's data.")


class StringValueSource(_Model):
    """A plain value, or one read from a ConfigMap or Secret key."""

    value: str | None = Field(default=None, min_length=1, max_length=253,
                              description="The value itself.")
    secret_key_ref: SecretKeySelector | None = Field(
        default=None, description="A Secret key holding the value.")
    config_map_key_ref: ConfigMapKeySelector | None = Field(
        default=None, description="A ConfigMap key holding the value.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> StringValueSource:
        given = [self.value is not None, self.secret_key_ref is not None,
                 self.config_map_key_ref is not None]
        if sum(given) != 1:
            raise ValueError("set exactly one of value, secretKeyRef and configMapKeyRef")
        return self


class SslMode(StrEnum):
    """libpq's sslmode values, from weakest to strongest."""

    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


class DatabaseReference(_Model):
    """Database location and login: a URI from a Secret, or host and database."""

    uri_from: SecretValueSource | None = Field(
        default=None,
        description="A Secret key holding a postgresql:// URI. Excludes host and database.")
    host: str | None = Field(default=None, min_length=1, max_length=253, pattern=HOST_PATTERN,
                             description="Host name or IP address of the server.")
    port: int = Field(default=5432, ge=1, le=65535, description="TCP port of the server.")
    database: str | None = Field(default=None, min_length=1, max_length=63,
                                 description="Database name.")
    user: str | None = Field(default=None, min_length=1, max_length=63,
                             description="Login role name.")
    user_from: StringValueSource | None = Field(
        default=None, description="The login role name, read from a Secret or ConfigMap.")
    password_from: SecretValueSource | None = Field(
        default=None, description="A Secret key holding the password.")
    ssl_mode: SslMode | None = Field(
        default=None, description="libpq sslmode; verify-ca and verify-full need caCertFrom.")
    ca_cert_from: SecretValueSource | None = Field(
        default=None, description="A Secret key holding the PEM CA bundle for verify-ca/full.")

    @model_validator(mode="after")
    def _uri_or_host(self) -> DatabaseReference:
        if self.uri_from is not None and (self.host is not None or self.database is not None):
            raise ValueError("set either uriFrom or host and database, not both")
        if self.uri_from is None and (self.host is None or self.database is None):
            raise ValueError("set uriFrom, or both host and database")
        if self.user is not None and self.user_from is not None:
            raise ValueError("set either user or userFrom, not both")
        needs_ca = self.ssl_mode in (SslMode.VERIFY_CA, SslMode.VERIFY_FULL)
        if needs_ca and self.ca_cert_from is None:
            raise ValueError(f"sslMode {self.ssl_mode} needs caCertFrom naming a Secret key "
                             "with the CA certificate")
        return self


class ConfigMapSource(_Model):
    """A ConfigMap whose keys are Alembic revision files (``key`` picks a single one)."""

    name: str = Field(min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN,
                      description="Name of the ConfigMap.")
    key: str | None = Field(default=None, min_length=1, max_length=253,
                            pattern=DATA_KEY_PATTERN,
                            description="Only this key; all keys ending in .py when unset.")


class MigrationsSource(_Model):
    """Source of the Alembic revision files: ConfigMaps, a directory, or an image."""

    config_maps: list[ConfigMapSource] | None = Field(
        default=None, min_length=1, max_length=32,
        description="ConfigMaps whose revision files are written to a private directory.")
    path: str | None = Field(
        default=None, min_length=1, max_length=4096, pattern=r"^/",
        description="Absolute path of a revision directory in the operator's image or volumes, "
        "or in migrations.image when that is set.")
    image: str | None = Field(
        default=None, min_length=1, max_length=512, pattern=IMAGE_PATTERN,
        description="An application image holding the revision directory at path; needs "
        "executor job.")
    run_in_image: bool = Field(
        default=False,
        description="Run the sync in image, which must have dbsync installed, instead of "
        "copying path out of it into dbsync's own image.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> MigrationsSource:
        if (self.config_maps is None) == (self.path is None):
            raise ValueError("set exactly one of migrations.configMaps and migrations.path")
        if self.image is not None and self.path is None:
            raise ValueError("migrations.image needs migrations.path, the revision directory "
                             "inside the image")
        if self.run_in_image and self.image is None:
            raise ValueError("migrations.runInImage needs migrations.image")
        return self


class DiffSpec(_Model):
    """Schema diff options."""

    ignore_schemas: list[str] = Field(default_factory=list, max_length=256,
                                      description="Schemas left out of the comparison.")
    ignore_patterns: list[str] = Field(
        default_factory=list, max_length=256,
        description="Glob patterns of qualified object names left out (schema.name).")
    ignore_kinds: list[str] = Field(
        default_factory=list, max_length=32,
        description="Object kinds left out, for example index or trigger.")
    fail_on_drift: bool = Field(
        default=True, description="Whether schema differences make the resource not Ready.")


class AuditDestination(StrEnum):
    """Database that receives the audit rows."""

    TARGET = "target"
    DATABASE = "database"


class AuditSpec(_Model):
    """Destination of the audit trail."""

    destination: AuditDestination = Field(
        default=AuditDestination.TARGET,
        description="target: the target database; database: the database given below.")
    database: DatabaseReference | None = Field(
        default=None, description="The audit database when destination is database.")

    @model_validator(mode="after")
    def _database_when_needed(self) -> AuditSpec:
        if self.destination is AuditDestination.DATABASE and self.database is None:
            raise ValueError("audit.destination database needs audit.database")
        if self.destination is AuditDestination.TARGET and self.database is not None:
            raise ValueError("audit.database is set but audit.destination is target")
        return self


class ExecutorKind(StrEnum):
    """Executor that runs a sync."""

    PROCESS = "process"
    JOB = "job"


class ApprovalMode(StrEnum):
    """Whether a sync applies its plan at once or waits for a person to approve it."""

    AUTO = "Auto"
    MANUAL = "Manual"


class ApprovalSpec(_Model):
    """Approval policy for the plans of syncs that change the target."""

    mode: ApprovalMode = Field(
        default=ApprovalMode.AUTO,
        description="Auto: apply at once. Manual: publish the plan in status.plan and apply it "
        "only once its hash is approved here or in the dbsync.io/approved-plan annotation.")
    approved_plan: str | None = Field(
        default=None, pattern=PLAN_HASH_PATTERN,
        description="Hash of the approved plan (64 lowercase hex digits, from status.plan.hash); "
        "counts only for a plan published before this spec generation.")
    max_age: str | None = Field(
        default=None, pattern=DURATION_PATTERN, max_length=32,
        description="A plan older than this (for example 24h) is not applied; a fresh plan is "
        "published instead. No limit when unset.")

    @model_validator(mode="after")
    def _manual_fields_need_manual(self) -> ApprovalSpec:
        if self.mode is ApprovalMode.AUTO and (self.approved_plan is not None
                                               or self.max_age is not None):
            raise ValueError("approval.approvedPlan and approval.maxAge need approval.mode "
                             "Manual: set the mode, or remove them")
        return self


class DatabaseSyncSpec(_Model):
    """Desired sync: databases, migrations, checks and re-check interval."""

    source: DatabaseReference = Field(description="The reference database.")
    target: DatabaseReference = Field(description="The database brought in step.")
    migrations: MigrationsSource | None = Field(
        default=None, description="Alembic revision files; no migration step when unset.")
    revision: str = Field(
        default="head", pattern=REVISION_PATTERN,
        description="head, source (the source's current revision) or a revision id.")
    transaction_mode: TransactionMode = Field(
        default=TransactionMode.ALL,
        description="all: one transaction for every revision; per-revision: one each.")
    dry_run: DryRunMode = Field(
        default=DryRunMode.OFF,
        description="off, plan (list pending revisions) or rehearse (apply, then roll back).")
    diff: DiffSpec = Field(default_factory=DiffSpec, description="Schema diff options.")
    ledger: LedgerConfig | None = Field(
        default=None, description="Ledger tables and checks; no ledger step when unset.")
    audit: AuditSpec = Field(default_factory=AuditSpec, description="Audit trail destination.")
    interval: str | None = Field(
        default=None, pattern=DURATION_PATTERN, max_length=32,
        description="Re-check drift and ledger this often, for example 5m or 1h.")
    migrate_on_interval: bool = Field(
        default=False, description="Whether periodic re-checks also apply pending revisions.")
    suspend: bool = Field(default=False, description="Stop every run while true.")
    backoff_limit: int = Field(
        default=6, ge=0, le=100,
        description="Consecutive failed syncs before the resource is Stalled.")
    sync_timeout_seconds: int = Field(
        default=1800, ge=10, le=86_400,
        description="Stop a sync's child process, or end its Job (activeDeadlineSeconds), "
        "after this many seconds.")
    lock_wait_seconds: int = Field(
        default=60, ge=0, le=86_400,
        description="How long to wait for the target's sync lock.")
    lock_timeout_ms: int | None = Field(
        default=None, ge=1, le=3_600_000, description="PostgreSQL lock_timeout for migrations.")
    statement_timeout_ms: int | None = Field(
        default=None, ge=1, le=86_400_000,
        description="PostgreSQL statement_timeout for migrations.")
    connect_timeout_seconds: int = Field(
        default=10, ge=1, le=600, description="Connection timeout for every database.")
    executor: ExecutorKind | None = Field(
        default=None,
        description="process: a child process of the operator; job: a Kubernetes Job per "
        "sync. The operator's --executor when unset.")
    approval: ApprovalSpec = Field(
        default_factory=ApprovalSpec,
        description="Whether a person must approve each sync's plan before it is applied.")

    @model_validator(mode="after")
    def _plan_needs_local_revisions(self) -> DatabaseSyncSpec:
        # TODO: compute the plan in a Job too; the operator cannot read revisions in an image.
        manual = self.approval.mode is ApprovalMode.MANUAL
        if manual and self.migrations is not None and self.migrations.image is not None:
            raise ValueError("approval.mode Manual does not support migrations.image yet: the "
                             "operator computes plans itself and cannot read the image's "
                             "revisions; use migrations.configMaps or migrations.path")
        return self


class ConditionStatus(StrEnum):
    """A condition's status, as Kubernetes spells it."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    """One condition, following the Kubernetes API conventions."""

    type: str = Field(min_length=1, max_length=316, description="Condition type.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(min_length=1, max_length=1024,
                        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                        description="CamelCase reason for the last transition.")
    message: str = Field(default="", max_length=32768, description="Details for people.")
    last_transition_time: datetime = Field(
        description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The generation this condition describes.")


class StepStatus(_Model):
    """One pipeline step of the last sync."""

    name: str = Field(description="Step name.")
    operation_id: str | None = Field(default=None, description="Audit operation id.")
    result: str = Field(description="Succeeded, Failed, Skipped or Error.")
    duration_ms: int = Field(ge=0, description="Duration in milliseconds.")


class LastSyncStatus(_Model):
    """The most recent finished sync."""

    sync_id: str = Field(description="The sync id; audit rows carry the same id.")
    started_at: datetime = Field(description="When the operator started the sync.")
    finished_at: datetime = Field(description="When the sync ended.")
    duration_ms: int = Field(ge=0, description="Wall-clock duration in milliseconds.")
    dry_run: str = Field(description="The dry-run mode of that sync.")
    result: str = Field(description="Succeeded, Failed or Error.")
    trigger: str | None = Field(
        default=None, description="What started it: Create, Resume, Update, RunAt, "
        "Interval, Reference, Retry or Approval.")
    steps: list[StepStatus] = Field(default_factory=list, description="Per-step outcomes.")


class MigrationStatus(_Model):
    """Revision state of the target after the last sync that ran migrations."""

    current_revision: str | None = Field(default=None, description="The target's revision.")
    target_revision: str | None = Field(default=None, description="The requested revision.")
    applied: int = Field(default=0, ge=0, description="Revisions the last sync applied.")


class DriftStatus(_Model):
    """Summary of the last schema diff; details are in the audit trail."""

    in_sync: bool = Field(description="Whether source and target schemas match.")
    differences: int = Field(ge=0, description="Number of differences.")
    by_kind: dict[str, int] = Field(default_factory=dict,
                                    description="Number of differences per object kind.")


class LedgerStatus(_Model):
    """Summary of the last ledger check; amounts stay in the audit trail."""

    balanced: bool = Field(description="Whether every ledger check passed.")
    failed_checks: list[str] = Field(default_factory=list,
                                     description="Names of the checks that did not pass.")


class ActiveJobStatus(_Model):
    """The sync Job running now, recorded before it is created so a restart finds it."""

    name: str = Field(description="Name of the Job.")
    sync_id: str = Field(description="The sync id the Job runs.")
    started_at: datetime = Field(description="When the operator started the sync.")
    trigger: str | None = Field(default=None, description="What started the sync.")


class PlanStatus(_Model):
    """The plan waiting for approval; its SQL stays in the audit trail (the PLAN operation)."""

    hash: str = Field(pattern=PLAN_HASH_PATTERN, description="The hash to approve.")
    created_at: datetime = Field(description="When the plan was computed.")
    expires_at: datetime | None = Field(
        default=None, description="When the plan expires (createdAt plus approval.maxAge).")
    generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the plan was computed for.")
    reason: str = Field(
        description="Why it was published: ApprovalPending, PlanChanged or PlanExpired.")
    sync_id: str | None = Field(
        default=None, description="Sync id of the audit rows that hold the full plan.")
    current_revision: str | None = Field(default=None, description="The target's revision.")
    target_revision: str | None = Field(default=None,
                                        description="The revision the sync would reach.")
    downgrade: bool = Field(default=False, description="Whether the revisions run downwards.")
    revisions: list[str] = Field(default_factory=list,
                                 description="Ids of the pending revisions, in order.")
    non_transactional: list[str] = Field(
        default_factory=list, description="Pending revisions that run outside a transaction.")
    schema_fingerprint: str = Field(
        description="SHA-256 of the target's schema objects when the plan was computed.")
    ledger_checks: list[str] = Field(default_factory=list,
                                     description="Ledger checks the sync would run.")


class ApprovalStatus(_Model):
    """The last approval the operator acted on, and what became of it."""

    plan_hash: str = Field(pattern=PLAN_HASH_PATTERN, description="The approved hash.")
    source: str = Field(description="Spec (spec.approval.approvedPlan) or Annotation "
                        "(dbsync.io/approved-plan).")
    approver: str = Field(description="Who approved, as far as the operator can tell; the "
                          "audit rows carry the same text.")
    result: str = Field(description="Applied (the sync ran with the plan), Failed (it ran "
                        "and failed), PlanChanged or PlanExpired (nothing applied).")
    sync_id: str | None = Field(default=None,
                                description="The sync that ran with the approval.")
    handled_at: datetime = Field(description="When the operator acted on the approval.")


class DatabaseSyncStatus(_Model):
    """Observed state, written only by the operator."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The generation the status describes.")
    conditions: list[Condition] = Field(default_factory=list,
                                        description="Ready, Reconciling, Stalled and per-step.")
    last_sync: LastSyncStatus | None = Field(default=None, description="The last sync.")
    migration: MigrationStatus | None = Field(default=None, description="Revision state.")
    drift: DriftStatus | None = Field(default=None, description="Schema drift summary.")
    ledger: LedgerStatus | None = Field(default=None, description="Ledger check summary.")
    last_handled_run_at: str | None = Field(
        default=None, description="The dbsync.io/run-at annotation value last acted on.")
    failures: int = Field(default=0, ge=0, description="Consecutive failed syncs.")
    active_job: ActiveJobStatus | None = Field(
        default=None, description="The sync Job running now, in job mode.")
    plan: PlanStatus | None = Field(
        default=None, description="The plan waiting for approval, with approval.mode Manual.")
    last_approval: ApprovalStatus | None = Field(
        default=None, description="The last approval the operator acted on.")


def parse_spec(spec: dict[str, Any]) -> DatabaseSyncSpec:
    """Validate a resource's spec, raising pydantic's ValidationError when it is invalid."""
    return DatabaseSyncSpec.model_validate(spec)


def dump_status(status: DatabaseSyncStatus) -> dict[str, Any]:
    """Return the status as camelCase JSON, timestamps as RFC 3339 strings."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
