"""Property-based tests of the DatabaseSync spec model and its generated CRD schema.

Valid specs drawn by hypothesis must pass both the CRD schema (as the API emulator applies
it: prune, default, validate) and the pydantic model, and survive a round trip through the
model. Out-of-range or mistyped values must be rejected by both, each naming the field.
"""

from __future__ import annotations

import copy
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dbsync.k8s.crd import build_crd
from dbsync.k8s.models import DatabaseSyncSpec
from dbsync.testing.kubeapi.schema import prepare

SCHEMA: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

_LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")
_KEY = st.from_regex(r"\A[-._a-zA-Z0-9]{1,30}\Z")
_HOST = st.from_regex(r"\A[a-z0-9]([-a-z0-9.]{0,30}[a-z0-9])?\Z")
_NAME_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1,
                     max_size=63)


def _secret_ref() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda name, key: {"secretKeyRef": {"name": name, "key": key}},
                     _LABEL, _KEY)


def _database_reference() -> st.SearchStrategy[dict[str, Any]]:
    uri_form = st.builds(lambda ref: {"uriFrom": ref}, _secret_ref())
    host_form = st.fixed_dictionaries(
        {"host": _HOST, "database": _NAME_TEXT, "passwordFrom": _secret_ref()},
        optional={"port": st.integers(1, 65535), "user": _NAME_TEXT,
                  "sslMode": st.sampled_from(["disable", "allow", "prefer", "require"])})
    return st.one_of(uri_form, host_form)


def valid_specs() -> st.SearchStrategy[dict[str, Any]]:
    """Specs the schema and the model must both accept."""
    return st.fixed_dictionaries(
        {"source": _database_reference(), "target": _database_reference()},
        optional={
            "revision": st.one_of(st.just("head"), st.just("source"),
                                  st.from_regex(r"\A[A-Za-z0-9_]{1,40}\Z")),
            "transactionMode": st.sampled_from(["all", "per-revision"]),
            "dryRun": st.sampled_from(["off", "plan", "rehearse"]),
            "migrations": st.one_of(
                st.builds(lambda names: {"configMaps": [{"name": name} for name in names]},
                          st.lists(_LABEL, min_size=1, max_size=3)),
                st.builds(lambda tail: {"path": "/" + tail},
                          st.text(alphabet=string.ascii_lowercase + "/", max_size=30))),
            "interval": st.builds(lambda count, unit: f"{count}{unit}",
                                  st.integers(1, 999), st.sampled_from(["s", "m", "h"])),
            "suspend": st.booleans(),
            "migrateOnInterval": st.booleans(),
            "backoffLimit": st.integers(0, 100),
            "syncTimeoutSeconds": st.integers(10, 86_400),
            "lockWaitSeconds": st.integers(0, 86_400),
            "lockTimeoutMs": st.integers(1, 3_600_000),
            "statementTimeoutMs": st.integers(1, 86_400_000),
            "connectTimeoutSeconds": st.integers(1, 600),
            "diff": st.fixed_dictionaries({}, optional={
                "ignoreSchemas": st.lists(_NAME_TEXT, max_size=3),
                "failOnDrift": st.booleans()}),
        })


def _schema_errors(spec: dict[str, Any]) -> list[str]:
    resource = {"apiVersion": "dbsync.io/v1alpha1", "kind": "DatabaseSync",
                "metadata": {"name": "generated"}, "spec": copy.deepcopy(spec)}
    _, errors = prepare(resource, SCHEMA)
    return [str(error) for error in errors]


@PROPERTY_SETTINGS
@given(spec=valid_specs())
def test_valid_spec_passes_schema_and_model(spec: dict[str, Any]) -> None:
    """A generated valid spec is accepted by the CRD schema and by the model."""
    errors = _schema_errors(spec)
    model = DatabaseSyncSpec.model_validate(spec)

    assert errors == []
    assert model.source is not None


@PROPERTY_SETTINGS
@given(spec=valid_specs())
def test_valid_spec_round_trips_through_model(spec: dict[str, Any]) -> None:
    """Dumping the model by alias and validating again gives the same model and schema pass."""
    model = DatabaseSyncSpec.model_validate(spec)
    dumped = model.model_dump(mode="json", by_alias=True, exclude_none=True)

    assert DatabaseSyncSpec.model_validate(dumped) == model
    assert _schema_errors(dumped) == []


# Each integer field with its valid range; values just outside must be rejected.
INTEGER_RANGES = {
    "backoffLimit": (0, 100),
    "syncTimeoutSeconds": (10, 86_400),
    "lockWaitSeconds": (0, 86_400),
    "lockTimeoutMs": (1, 3_600_000),
    "statementTimeoutMs": (1, 86_400_000),
    "connectTimeoutSeconds": (1, 600),
}


def _out_of_range(field: str) -> st.SearchStrategy[int]:
    low, high = INTEGER_RANGES[field]
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1))


@PROPERTY_SETTINGS
@given(spec=valid_specs(), data=st.data())
def test_out_of_range_integer_is_rejected_naming_field(spec: dict[str, Any],
                                                       data: st.DataObject) -> None:
    """An integer outside its range fails the schema and the model, both naming the field."""
    field = data.draw(st.sampled_from(sorted(INTEGER_RANGES)))
    spec = {**spec, field: data.draw(_out_of_range(field))}

    errors = _schema_errors(spec)
    with pytest.raises(ValidationError) as raised:
        DatabaseSyncSpec.model_validate(spec)
    locations = [".".join(str(part) for part in error["loc"]) for error in raised.value.errors()]

    assert any(error.startswith(f"spec.{field}:") for error in errors), errors
    assert field in locations


@PROPERTY_SETTINGS
@given(spec=valid_specs(), field=st.sampled_from(sorted(INTEGER_RANGES)),
       value=st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2)))
def test_mistyped_integer_is_rejected_by_schema(spec: dict[str, Any], field: str,
                                                value: object) -> None:
    """A string, boolean or list where an integer belongs fails the schema, naming the field."""
    errors = _schema_errors({**spec, field: value})

    assert any(error.startswith(f"spec.{field}:") for error in errors), errors


@PROPERTY_SETTINGS
@given(spec=valid_specs(), field=st.sampled_from(sorted(INTEGER_RANGES)),
       value=st.one_of(st.text(alphabet=string.ascii_letters + " ;'\"-", max_size=5),
                       st.lists(st.integers(), max_size=2)))
def test_non_numeric_integer_is_rejected_by_model(spec: dict[str, Any], field: str,
                                                  value: object) -> None:
    """Text that is not a number, or a list, where an integer belongs fails the model.

    NOTE: the model validates in pydantic's lax mode, so it coerces "5", true and "yes"
    that the schema rejects; only a server without the CRD schema could send those.
    """
    with pytest.raises(ValidationError) as raised:
        DatabaseSyncSpec.model_validate({**spec, field: value})
    locations = [".".join(str(part) for part in error["loc"]) for error in raised.value.errors()]

    assert field in locations


@PROPERTY_SETTINGS
@given(spec=valid_specs(),
       revision=st.text(min_size=1, max_size=200).filter(
           lambda text: not all(character in string.ascii_letters + string.digits + "_"
                                for character in text) or len(text) > 128))
def test_revision_outside_pattern_is_rejected(spec: dict[str, Any], revision: str) -> None:
    """A revision with characters outside [A-Za-z0-9_] (quotes, semicolons) is rejected."""
    spec = {**spec, "revision": revision}

    errors = _schema_errors(spec)
    with pytest.raises(ValidationError) as raised:
        DatabaseSyncSpec.model_validate(spec)
    locations = [".".join(str(part) for part in error["loc"]) for error in raised.value.errors()]

    assert any(error.startswith("spec.revision:") for error in errors), errors
    assert "revision" in locations
