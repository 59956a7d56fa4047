"""API errors of the emulated Kubernetes API server, rendered as ``metav1.Status`` bodies.

Messages, reasons and codes follow the real API server's wording so that clients which match on
them (kubectl's error printer, kopf's retry logic) behave as they would against a cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StatusCause:
    """One entry of ``details.causes``: a reason such as ``FieldValueRequired`` and a field."""

    reason: str
    message: str
    field: str

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}


@dataclass
class ApiError(Exception):
    """An error sent as a ``Status`` object with the HTTP ``code``."""

    code: int
    reason: str
    message: str
    name: str | None = None
    group: str | None = None
    kind: str | None = None
    causes: list[StatusCause] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def to_status(self) -> dict[str, Any]:
        """Return the ``Status`` body the real server sends for this error."""
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        details: dict[str, Any] = {}
        if self.name is not None:
            details["name"] = self.name
        if self.group:
            details["group"] = self.group
        if self.kind is not None:
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = [cause.to_dict() for cause in self.causes]
        if details:
            status["details"] = details
        return status


def qualified_resource(group: str, plural: str) -> str:
    """Return ``plural.group`` (or ``plural`` for the core group), as the server names it."""
    return f"{plural}.{group}" if group else plural


def not_found(group: str, plural: str, name: str) -> ApiError:
    return ApiError(
        code=404,
        reason="NotFound",
        message=f'{qualified_resource(group, plural)} "{name}" not found',
        name=name,
        group=group,
        kind=plural,
    )


def already_exists(group: str, plural: str, name: str) -> ApiError:
    return ApiError(
        code=409,
        reason="AlreadyExists",
        message=f'{qualified_resource(group, plural)} "{name}" already exists',
        name=name,
        group=group,
        kind=plural,
    )


def conflict(group: str, plural: str, name: str) -> ApiError:
    return ApiError(
        code=409,
        reason="Conflict",
        message=(
            f"Operation cannot be fulfilled on {qualified_resource(group, plural)} "
            f'"{name}": the object has been modified; please apply your changes to the '
            "latest version and try again"
        ),
        name=name,
        group=group,
        kind=plural,
    )


def bad_request(message: str) -> ApiError:
    return ApiError(code=400, reason="BadRequest", message=message)


def method_not_allowed(message: str) -> ApiError:
    return ApiError(code=405, reason="MethodNotAllowed", message=message)


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        code=415,
        reason="UnsupportedMediaType",
        message=f'the body of the request was in an unknown format - accepted media types '
        f'include: application/json-patch+json, application/merge-patch+json, '
        f'application/apply-patch+yaml (got "{content_type}")',
    )


def gone(requested: int, oldest: int) -> ApiError:
    return ApiError(
        code=410,
        reason="Expired",
        message=f"too old resource version: {requested} ({oldest})",
    )


def forbidden(group: str, plural: str, name: str, detail: str) -> ApiError:
    return ApiError(
        code=403,
        reason="Forbidden",
        message=f'{qualified_resource(group, plural)} "{name}" is forbidden: {detail}',
        name=name,
        group=group,
        kind=plural,
    )


def format_field_value(value: Any) -> str:
    """Format a value the way Go's ``field.Error`` prints it (strings quoted, null as null)."""
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class FieldError:
    """One validation failure: a cause reason, the field path and the detail after it."""

    reason: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.path else self.detail


def invalid(
    *, kind: str, group: str, name: str, errors: list[FieldError]
) -> ApiError:
    """Build the ``422 Invalid`` error the real server returns for failed validation."""
    qualified_kind = f"{kind}.{group}" if group else kind
    rendered = [str(error) for error in errors]
    summary = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
    return ApiError(
        code=422,
        reason="Invalid",
        message=f'{qualified_kind} "{name}" is invalid: {summary}',
        name=name,
        group=group,
        kind=kind,
        causes=[
            StatusCause(reason=error.reason, message=error.detail, field=error.path)
            for error in errors
        ],
    )
