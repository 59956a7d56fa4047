"""The API emulator's REST behaviour, checked over HTTP without kubectl or kopf."""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import urllib.request
from typing import Any

import pytest

from dbsync.testing.kubeapi import KubeApiServer, WriteEvent
from tests.kubeapi_client import WIDGETS, ApiClient, client_for
from tests.kubeapi_fixtures import kubeapi  # noqa: F401
from tests.kubeapi_manifests import GROUP, PLURAL, VERSION, WIDGET_CRD, widget

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


@pytest.fixture
def api(kubeapi: KubeApiServer) -> ApiClient:  # noqa: F811
    """A client for the emulator with the Widget CRD installed."""
    client = client_for(kubeapi)
    client.install_widget_crd()
    return client


def create_widget(api: ApiClient, name: str, **spec: Any) -> dict[str, Any]:
    reply = api.call("POST", WIDGETS, widget(name, **spec))
    assert reply.status == 201, reply.body
    body: dict[str, Any] = reply.body
    return body


# --- discovery ---------------------------------------------------------------------------


def test_discovery_lists_crd_resource_and_status(api: ApiClient) -> None:
    """A created CRD shows up in /apis and in its group-version's resource list."""
    groups = api.call("GET", "/apis").body["groups"]
    assert GROUP in [group["name"] for group in groups]
    resources = {entry["name"]: entry
                 for entry in api.call("GET", f"/apis/{GROUP}/{VERSION}").body["resources"]}
    assert resources[PLURAL]["kind"] == "Widget"
    assert resources[PLURAL]["namespaced"] is True
    assert resources[PLURAL]["shortNames"] == ["wdg"]
    assert resources[PLURAL]["categories"] == ["dbsync"]
    assert "watch" in resources[PLURAL]["verbs"]
    assert resources[f"{PLURAL}/status"]["verbs"] == ["get", "patch", "update"]


def test_discovery_core_group_has_dbsync_kinds(api: ApiClient) -> None:
    """The core group serves the kinds dbsync touches, and /version reports 1.32."""
    names = {entry["name"] for entry in api.call("GET", "/api/v1").body["resources"]}
    assert {"namespaces", "secrets", "configmaps", "events", "pods"} <= names
    assert api.call("GET", "/version").body["minor"] == "32"


def test_crd_deletion_stops_serving(api: ApiClient) -> None:
    """Deleting the CRD removes its objects and its resource from discovery."""
    create_widget(api, "gone")
    reply = api.call("DELETE", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                     f"{PLURAL}.{GROUP}")
    assert reply.status == 200
    assert api.call("GET", f"/apis/{GROUP}/{VERSION}").status == 404
    assert api.call("GET", f"{WIDGETS}/gone").status == 404


def test_crd_without_schema_is_rejected(api: ApiClient) -> None:
    """A CRD version without openAPIV3Schema is invalid, as in apiextensions.k8s.io/v1."""
    crd = copy.deepcopy(WIDGET_CRD)
    crd["metadata"]["name"] = f"gadgets.{GROUP}"
    crd["spec"]["names"] = {"plural": "gadgets", "kind": "Gadget"}
    del crd["spec"]["versions"][0]["schema"]
    reply = api.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert reply.status == 422
    assert reply.body["details"]["causes"][0]["field"] == (
        "spec.versions[0].schema.openAPIV3Schema")


def test_crd_status_reports_established(api: ApiClient) -> None:
    """A created CRD carries Established and NamesAccepted conditions."""
    crd = api.call("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                   f"{PLURAL}.{GROUP}").body
    conditions = {item["type"]: item["status"] for item in crd["status"]["conditions"]}
    assert conditions == {"Established": "True", "NamesAccepted": "True"}
    assert crd["spec"]["names"]["listKind"] == "WidgetList"


def test_invalid_crd_name_leaves_nothing_served(api: ApiClient) -> None:
    """A CRD rejected for its metadata does not start serving its resources."""
    crd = copy.deepcopy(WIDGET_CRD)
    crd["metadata"]["name"] = f"{PLURAL}.Bad.example.io"
    crd["spec"]["group"] = "Bad.example.io"
    reply = api.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert reply.status == 422
    assert reply.body["details"]["causes"][0]["field"] == "metadata.name"
    assert api.call("GET", "/apis/Bad.example.io/v1").status == 404


def test_crd_reapply_without_change_keeps_version(api: ApiClient) -> None:
    """Re-sending an unchanged CRD writes nothing."""
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}"
    before = api.call("GET", path).body
    after = api.call("PUT", path, before).body
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_crd_finalizer_release_removes_resources(api: ApiClient) -> None:
    """A CRD deleted through its last finalizer stops serving its resources."""
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}"
    api.call("PATCH", path, {"metadata": {"finalizers": ["example.io/hold"]}},
             content_type=MERGE)
    api.call("DELETE", path)
    assert api.call("GET", f"/apis/{GROUP}/{VERSION}").status == 200
    api.call("PATCH", path, {"metadata": {"finalizers": None}}, content_type=MERGE)
    assert api.call("GET", path).status == 404
    assert api.call("GET", f"/apis/{GROUP}/{VERSION}").status == 404


# --- metadata, resourceVersion and generation --------------------------------------------


def test_create_sets_server_metadata(api: ApiClient) -> None:
    """Creation fills uid, creationTimestamp, generation 1 and a resourceVersion."""
    metadata = create_widget(api, "meta")["metadata"]
    assert metadata["uid"]
    assert metadata["creationTimestamp"].endswith("Z")
    assert metadata["generation"] == 1
    assert int(metadata["resourceVersion"]) > 0


def test_resource_version_is_one_cluster_counter(api: ApiClient) -> None:
    """Writes to different kinds draw from the same increasing counter."""
    first = int(create_widget(api, "one")["metadata"]["resourceVersion"])
    config_map = api.call("POST", "/api/v1/namespaces/default/configmaps",
                          {"metadata": {"name": "c"}, "data": {"k": "v"}}).body
    second = int(create_widget(api, "two")["metadata"]["resourceVersion"])
    assert int(config_map["metadata"]["resourceVersion"]) == first + 1
    assert second == first + 2


def test_update_with_stale_version_conflicts(api: ApiClient) -> None:
    """A PUT carrying an old resourceVersion gets 409 Conflict."""
    created = create_widget(api, "stale")
    first = api.call("PATCH", f"{WIDGETS}/stale", {"spec": {"replicas": 2}},
                     content_type=MERGE)
    assert first.status == 200
    created["spec"]["replicas"] = 3
    reply = api.call("PUT", f"{WIDGETS}/stale", created)
    assert reply.status == 409
    assert reply.body["reason"] == "Conflict"
    assert "the object has been modified" in reply.body["message"]


def test_update_with_current_version_succeeds(api: ApiClient) -> None:
    """A PUT carrying the current resourceVersion is stored."""
    created = create_widget(api, "fresh")
    created["spec"]["replicas"] = 4
    reply = api.call("PUT", f"{WIDGETS}/fresh", created)
    assert reply.status == 200
    assert reply.body["spec"]["replicas"] == 4


def test_json_patch_with_stale_version_conflicts(api: ApiClient) -> None:
    """A JSON patch that sets an old resourceVersion gets 409 Conflict."""
    created = create_widget(api, "jp")
    api.call("PATCH", f"{WIDGETS}/jp", {"spec": {"replicas": 2}}, content_type=MERGE)
    reply = api.call("PATCH", f"{WIDGETS}/jp", [
        {"op": "replace", "path": "/metadata/resourceVersion",
         "value": created["metadata"]["resourceVersion"]},
        {"op": "replace", "path": "/spec/replicas", "value": 5},
    ], content_type=JSON_PATCH)
    assert reply.status == 409


def test_json_patch_failed_test_op_is_rejected(api: ApiClient) -> None:
    """A JSON patch whose test op fails is rejected (422, as the real server does)."""
    create_widget(api, "jt")
    reply = api.call("PATCH", f"{WIDGETS}/jt", [
        {"op": "test", "path": "/spec/replicas", "value": 7},
        {"op": "replace", "path": "/spec/replicas", "value": 5},
    ], content_type=JSON_PATCH)
    assert reply.status == 422
    assert api.call("GET", f"{WIDGETS}/jt").body["spec"]["replicas"] == 1


def test_json_patch_passing_test_op_applies(api: ApiClient) -> None:
    """A JSON patch whose test op passes applies its other operations."""
    create_widget(api, "jok")
    reply = api.call("PATCH", f"{WIDGETS}/jok", [
        {"op": "test", "path": "/spec/replicas", "value": 1},
        {"op": "add", "path": "/spec/tags", "value": ["a"]},
    ], content_type=JSON_PATCH)
    assert reply.status == 200
    assert reply.body["spec"]["tags"] == ["a"]


def test_generation_bumps_only_on_spec_change(api: ApiClient) -> None:
    """Spec changes bump generation; label and status changes do not."""
    create_widget(api, "gen")
    spec_change = api.call("PATCH", f"{WIDGETS}/gen", {"spec": {"replicas": 2}},
                           content_type=MERGE).body
    label_change = api.call("PATCH", f"{WIDGETS}/gen",
                            {"metadata": {"labels": {"a": "b"}}}, content_type=MERGE).body
    status_change = api.call("PATCH", f"{WIDGETS}/gen/status",
                             {"status": {"observedGeneration": 2}}, content_type=MERGE).body
    assert spec_change["metadata"]["generation"] == 2
    assert label_change["metadata"]["generation"] == 2
    assert status_change["metadata"]["generation"] == 2


def test_unchanged_patch_keeps_resource_version(api: ApiClient) -> None:
    """A patch that changes nothing writes nothing, so the resourceVersion stays."""
    created = create_widget(api, "same")
    reply = api.call("PATCH", f"{WIDGETS}/same", {"spec": {"mode": "fast"}},
                     content_type=MERGE)
    assert reply.body["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_main_resource_write_ignores_status(api: ApiClient) -> None:
    """Status sent to the main resource is dropped when a status subresource exists."""
    body = widget("st", replicas=2)
    body["status"] = {"observedGeneration": 9}
    created = api.call("POST", WIDGETS, body).body
    patched = api.call("PATCH", f"{WIDGETS}/st", {"status": {"observedGeneration": 5}},
                       content_type=MERGE).body
    assert "status" not in created
    assert "status" not in patched


def test_status_write_ignores_spec(api: ApiClient) -> None:
    """A write to /status changes status only."""
    create_widget(api, "ss")
    reply = api.call("PATCH", f"{WIDGETS}/ss/status",
                     {"spec": {"replicas": 9}, "status": {"observedGeneration": 1}},
                     content_type=MERGE).body
    assert reply["spec"]["replicas"] == 1
    assert reply["status"] == {"observedGeneration": 1}


def test_status_write_prunes_undeclared_fields(api: ApiClient) -> None:
    """Status fields the schema does not declare are dropped silently."""
    create_widget(api, "sp")
    reply = api.call("PATCH", f"{WIDGETS}/sp/status",
                     {"status": {"observedGeneration": 1, "undeclared": "x"}},
                     content_type=MERGE).body
    assert reply["status"] == {"observedGeneration": 1}


# --- validation, defaulting, pruning -----------------------------------------------------


@pytest.mark.parametrize(("spec", "field", "reason", "detail"), [
    ({"mode": "slow"}, "spec.mode", "FieldValueNotSupported",
     'Unsupported value: "slow": supported values: "fast", "safe"'),
    ({"replicas": 11}, "spec.replicas", "FieldValueInvalid",
     "Invalid value: 11: spec.replicas in body should be less than or equal to 10"),
    ({"replicas": -1}, "spec.replicas", "FieldValueInvalid",
     "Invalid value: -1: spec.replicas in body should be greater than or equal to 0"),
    ({"replicas": "two"}, "spec.replicas", "FieldValueTypeInvalid",
     'Invalid value: "string": spec.replicas in body must be of type integer: "string"'),
    ({"owner": "Bob"}, "spec.owner", "FieldValueInvalid",
     "Invalid value: \"Bob\": spec.owner in body should match '^[a-z]+$'"),
    ({"owner": "abcdefghijklmn"}, "spec.owner", "FieldValueTooLong",
     "Too long: may not be more than 12 bytes"),
    ({"tags": ["a", "b", "c", "d"]}, "spec.tags", "FieldValueTooMany",
     "Too many: 4: must have at most 3 items"),
    ({"tags": [""]}, "spec.tags[0]", "FieldValueInvalid",
     'Invalid value: "": spec.tags[0] in body should be at least 1 chars long'),
    ({"limits": {"cpu": "x"}}, "spec.limits[cpu]", "FieldValueTypeInvalid",
     'Invalid value: "string": spec.limits[cpu] in body must be of type integer: "string"'),
    ({"startAt": "yesterday"}, "spec.startAt", "FieldValueInvalid",
     'Invalid value: "yesterday": spec.startAt in body must be of type date-time: '
     '"yesterday"'),
    ({"paused": None}, "spec.paused", "FieldValueTypeInvalid", None),
])
def test_invalid_field_is_rejected(
    api: ApiClient, spec: dict[str, Any], field: str, reason: str, detail: str | None
) -> None:
    """Each schema violation gives 422 Invalid with a cause naming the field."""
    body = widget("bad")
    body["spec"].update(spec)
    if spec.get("paused", True) is None:
        # Why: a null with a default is defaulted, so use a field without one.
        body["spec"] = {"mode": "fast", "owner": None}
        field = "spec.owner"
    reply = api.call("POST", WIDGETS, body)
    assert reply.status == 422
    assert reply.body["reason"] == "Invalid"
    cause = reply.body["details"]["causes"][0]
    assert cause["field"] == field
    assert cause["reason"] == reason
    if detail is not None:
        assert cause["message"] == detail
        assert reply.body["message"] == f'Widget.{GROUP} "bad" is invalid: {field}: {detail}'


def test_missing_required_field_is_rejected(api: ApiClient) -> None:
    """A missing required field is reported as Required value."""
    body = widget("req")
    del body["spec"]["mode"]
    reply = api.call("POST", WIDGETS, body)
    assert reply.status == 422
    assert reply.body["message"] == f'Widget.{GROUP} "req" is invalid: spec.mode: Required value'


def test_every_violation_is_reported(api: ApiClient) -> None:
    """Several violations are listed together in one message."""
    reply = api.call("POST", WIDGETS, widget("many", mode="slow", replicas=99))
    fields = [cause["field"] for cause in reply.body["details"]["causes"]]
    assert fields == ["spec.mode", "spec.replicas"]
    assert reply.body["message"].startswith(f'Widget.{GROUP} "many" is invalid: [spec.mode: ')


def test_nullable_field_accepts_null(api: ApiClient) -> None:
    """A nullable field keeps an explicit null."""
    created = create_widget(api, "nul", note=None)
    assert created["spec"]["note"] is None


def test_defaults_are_applied(api: ApiClient) -> None:
    """Absent fields with defaults are filled, including inside defaulted objects."""
    spec = create_widget(api, "dflt")["spec"]
    assert spec["replicas"] == 1
    assert spec["paused"] is False
    assert spec["options"] == {"retries": 3}


def test_unknown_fields_are_pruned(api: ApiClient) -> None:
    """Undeclared fields are dropped, except under preserve-unknown-fields."""
    spec = create_widget(api, "prn", stray=1, extra={"free": {"form": True}})["spec"]
    assert "stray" not in spec
    assert spec["extra"] == {"free": {"form": True}}


def test_strict_field_validation_rejects_unknown_field(api: ApiClient) -> None:
    """With fieldValidation=Strict an unknown field is a 400 naming it."""
    reply = api.call("POST", f"{WIDGETS}?fieldValidation=Strict", widget("strict", stray=1))
    assert reply.status == 400
    assert 'unknown field "spec.stray"' in reply.body["message"]


def test_invalid_name_is_rejected(api: ApiClient) -> None:
    """Names must be lowercase RFC 1123 subdomains."""
    reply = api.call("POST", WIDGETS, widget("Bad_Name"))
    assert reply.status == 422
    assert reply.body["details"]["causes"][0]["field"] == "metadata.name"


def test_missing_namespace_is_not_found(api: ApiClient) -> None:
    """Creating in a namespace that does not exist gives 404."""
    reply = api.call("POST", f"/apis/{GROUP}/{VERSION}/namespaces/nowhere/{PLURAL}",
                     widget("x") | {"metadata": {"name": "x"}})
    assert reply.status == 404
    assert reply.body["message"] == 'namespaces "nowhere" not found'


def test_strategic_merge_patch_on_custom_resource_is_unsupported(api: ApiClient) -> None:
    """Custom resources reject strategic merge patch with 415."""
    create_widget(api, "smp")
    reply = api.call("PATCH", f"{WIDGETS}/smp", {"spec": {"replicas": 2}},
                     content_type="application/strategic-merge-patch+json")
    assert reply.status == 415


# --- deletion ----------------------------------------------------------------------------


def test_finalizer_holds_deletion_until_removed(api: ApiClient) -> None:
    """Delete marks an object with finalizers; removing the last one deletes it."""
    body = widget("fin")
    body["metadata"]["finalizers"] = ["example.dbsync.io/cleanup"]
    api.call("POST", WIDGETS, body)
    deleted = api.call("DELETE", f"{WIDGETS}/fin").body
    assert deleted["metadata"]["deletionTimestamp"]
    assert deleted["metadata"]["generation"] == 2
    assert api.call("GET", f"{WIDGETS}/fin").status == 200
    api.call("PATCH", f"{WIDGETS}/fin", {"metadata": {"finalizers": None}}, content_type=MERGE)
    assert api.call("GET", f"{WIDGETS}/fin").status == 404


def test_new_finalizer_on_deleting_object_is_forbidden(api: ApiClient) -> None:
    """No finalizer can be added once deletion started."""
    body = widget("fin2")
    body["metadata"]["finalizers"] = ["a.io/one"]
    api.call("POST", WIDGETS, body)
    api.call("DELETE", f"{WIDGETS}/fin2")
    reply = api.call("PATCH", f"{WIDGETS}/fin2",
                     {"metadata": {"finalizers": ["a.io/one", "a.io/two"]}}, content_type=MERGE)
    assert reply.status == 422
    assert reply.body["details"]["causes"][0]["field"] == "metadata.finalizers"


def test_delete_precondition_mismatch_conflicts(api: ApiClient) -> None:
    """A delete with a wrong uid precondition gets 409."""
    create_widget(api, "pre")
    reply = api.call("DELETE", f"{WIDGETS}/pre", {"preconditions": {"uid": "other"}})
    assert reply.status == 409


def test_namespace_deletion_removes_content(api: ApiClient) -> None:
    """Deleting a namespace removes the objects in it."""
    api.call("POST", "/api/v1/namespaces", {"metadata": {"name": "team"}})
    api.call("POST", "/api/v1/namespaces/team/configmaps", {"metadata": {"name": "c"}})
    assert api.call("DELETE", "/api/v1/namespaces/team").status == 200
    assert api.call("GET", "/api/v1/namespaces/team/configmaps/c").status == 404
    assert api.call("GET", "/api/v1/namespaces/team").status == 404


# --- built-in kinds ----------------------------------------------------------------------


def test_secret_string_data_is_folded(api: ApiClient) -> None:
    """Secret stringData is stored base64-encoded in data."""
    reply = api.call("POST", "/api/v1/namespaces/default/secrets", {
        "metadata": {"name": "s"}, "stringData": {"password": "hunter2"}})
    assert reply.body["data"] == {"password": base64.b64encode(b"hunter2").decode()}
    assert "stringData" not in reply.body
    assert reply.body["type"] == "Opaque"


def test_strategic_merge_patch_merges_containers(api: ApiClient) -> None:
    """A strategic merge patch on a Deployment merges containers by name."""
    deployment = {"metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [
        {"name": "app", "image": "app:1"}, {"name": "side", "image": "side:1"}]}}}}
    api.call("POST", "/apis/apps/v1/namespaces/default/deployments", deployment)
    reply = api.call(
        "PATCH", "/apis/apps/v1/namespaces/default/deployments/d",
        {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:2"}]}}}},
        content_type="application/strategic-merge-patch+json")
    containers = reply.body["spec"]["template"]["spec"]["containers"]
    assert containers == [{"name": "app", "image": "app:2"}, {"name": "side", "image": "side:1"}]
    assert reply.body["metadata"]["generation"] == 2


def test_lease_and_events_are_served(api: ApiClient) -> None:
    """Leases and both Event APIs accept creates."""
    lease = api.call("POST", "/apis/coordination.k8s.io/v1/namespaces/default/leases",
                     {"metadata": {"name": "l"}, "spec": {"holderIdentity": "me"}})
    core_event = api.call("POST", "/api/v1/namespaces/default/events",
                          {"metadata": {"name": "e.1"}, "reason": "Synced"})
    new_event = api.call("POST", "/apis/events.k8s.io/v1/namespaces/default/events",
                         {"metadata": {"name": "e.2"}, "reason": "Synced"})
    assert lease.status == 201
    assert core_event.status == 201
    assert new_event.status == 201


# --- lists, selectors, tables ------------------------------------------------------------


def test_list_filters_by_label_selector(api: ApiClient) -> None:
    """labelSelector supports equality, set and existence clauses."""
    for name, tier in (("a", "web"), ("b", "db"), ("c", None)):
        body = widget(name)
        if tier:
            body["metadata"]["labels"] = {"tier": tier}
        api.call("POST", WIDGETS, body)

    def names(selector: str) -> list[str]:
        items = api.call("GET", f"{WIDGETS}?labelSelector={selector}").body["items"]
        return [item["metadata"]["name"] for item in items]

    assert names("tier%3Dweb") == ["a"]
    assert names("tier%20in%20(web,db)") == ["a", "b"]
    assert names("!tier") == ["c"]
    assert names("tier!%3Dweb") == ["b", "c"]


def test_field_selector_outside_supported_labels_is_rejected(api: ApiClient) -> None:
    """Custom resources accept only metadata field labels, as on a real server."""
    create_widget(api, "fs")
    by_name = api.call("GET", f"{WIDGETS}?fieldSelector=metadata.name%3Dfs").body["items"]
    reply = api.call("GET", f"{WIDGETS}?fieldSelector=spec.mode%3Dfast")
    assert [item["metadata"]["name"] for item in by_name] == ["fs"]
    assert reply.status == 400
    assert reply.body["message"] == "field label not supported: spec.mode"


def test_event_field_selector_matches_involved_object(api: ApiClient) -> None:
    """Events are selectable by involvedObject fields, as kubectl describe does."""
    for name, target in (("e.1", "a"), ("e.2", "b")):
        api.call("POST", "/api/v1/namespaces/default/events", {
            "metadata": {"name": name}, "involvedObject": {"kind": "Widget", "name": target},
            "source": {"component": "dbsync"}, "reason": "Synced"})
    selector = "involvedObject.name%3Db,involvedObject.kind%3DWidget,source%3Ddbsync"
    items = api.call("GET", f"/api/v1/namespaces/default/events?fieldSelector={selector}"
                     ).body["items"]
    assert [item["metadata"]["name"] for item in items] == ["e.2"]


def test_list_pages_with_limit_and_continue(api: ApiClient) -> None:
    """limit and continue page through a list."""
    for name in ("p1", "p2", "p3"):
        create_widget(api, name)
    first = api.call("GET", f"{WIDGETS}?limit=2").body
    second = api.call("GET", f"{WIDGETS}?limit=2&continue={first['metadata']['continue']}").body
    assert [item["metadata"]["name"] for item in first["items"]] == ["p1", "p2"]
    assert [item["metadata"]["name"] for item in second["items"]] == ["p3"]
    assert "continue" not in second["metadata"]


def test_table_uses_printer_columns(api: ApiClient) -> None:
    """Table requests get Name plus the CRD's printer columns, with typed cells."""
    create_widget(api, "tab", replicas=3, owner="ann")
    api.call("PATCH", f"{WIDGETS}/tab/status", {"status": {"conditions": [
        {"type": "Ready", "status": "True", "reason": "Synced"}]}}, content_type=MERGE)
    table = api.call("GET", f"{WIDGETS}?includeObject=None",
                     headers={"Accept": TABLE}).body
    names = [column["name"] for column in table["columnDefinitions"]]
    assert table["kind"] == "Table"
    assert names == ["Name", "Ready", "Reason", "Replicas", "Paused", "Last Sync", "Age",
                     "Owner"]
    assert table["columnDefinitions"][-1]["priority"] == 1
    assert table["rows"][0]["cells"][:6] == ["tab", "True", "Synced", 3, False, None]
    assert table["rows"][0]["cells"][7] == "ann"
    assert "object" not in table["rows"][0]


def test_table_row_carries_requested_object(api: ApiClient) -> None:
    """includeObject=Metadata sends PartialObjectMetadata; Object sends the object."""
    create_widget(api, "obj")
    metadata_row = api.call("GET", f"{WIDGETS}/obj", headers={"Accept": TABLE}).body["rows"][0]
    object_row = api.call("GET", f"{WIDGETS}/obj?includeObject=Object",
                          headers={"Accept": TABLE}).body["rows"][0]
    assert metadata_row["object"]["kind"] == "PartialObjectMetadata"
    assert object_row["object"]["spec"]["mode"] == "fast"


# --- watches -----------------------------------------------------------------------------


def test_watch_replays_events_after_version(api: ApiClient) -> None:
    """A watch from a resourceVersion streams the later ADDED, MODIFIED and DELETED."""
    start = create_widget(api, "w0")["metadata"]["resourceVersion"]
    create_widget(api, "w1")
    api.call("PATCH", f"{WIDGETS}/w1", {"spec": {"replicas": 2}}, content_type=MERGE)
    api.call("DELETE", f"{WIDGETS}/w1")
    events = list(api.stream(f"{WIDGETS}?watch=true&resourceVersion={start}&timeoutSeconds=0"))
    assert [event["type"] for event in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[1]["object"]["spec"]["replicas"] == 2


def test_watch_without_version_starts_with_current_objects(api: ApiClient) -> None:
    """A watch without resourceVersion first sends ADDED for every existing object."""
    create_widget(api, "e1")
    create_widget(api, "e2")
    events = list(api.stream(f"{WIDGETS}?watch=true&timeoutSeconds=0"))
    assert [(event["type"], event["object"]["metadata"]["name"]) for event in events] == [
        ("ADDED", "e1"), ("ADDED", "e2")]


def test_watch_streams_live_events(api: ApiClient) -> None:
    """Writes made while a watch is open reach it."""
    version = api.call("GET", WIDGETS).body["metadata"]["resourceVersion"]

    def write_later() -> None:
        time.sleep(0.3)
        create_widget(api, "live")

    writer = threading.Thread(target=write_later)
    writer.start()
    events = list(api.stream(
        f"{WIDGETS}?watch=true&resourceVersion={version}&timeoutSeconds=1"))
    writer.join()
    assert [event["object"]["metadata"]["name"] for event in events] == ["live"]


def test_watch_honours_timeout_seconds(api: ApiClient) -> None:
    """An idle watch ends after timeoutSeconds."""
    started = time.monotonic()
    events = list(api.stream(f"{WIDGETS}?watch=true&resourceVersion=1&timeoutSeconds=1"))
    elapsed = time.monotonic() - started
    assert events == []
    assert 0.9 <= elapsed < 3


def test_watch_sends_bookmarks_when_allowed(api: ApiClient) -> None:
    """allowWatchBookmarks brings BOOKMARK events with the current resourceVersion."""
    version = api.call("GET", WIDGETS).body["metadata"]["resourceVersion"]
    events = list(api.stream(f"{WIDGETS}?watch=true&resourceVersion={version}"
                             "&allowWatchBookmarks=true&timeoutSeconds=1"))
    assert events
    assert {event["type"] for event in events} == {"BOOKMARK"}
    assert events[-1]["object"]["metadata"]["resourceVersion"] == version


def test_watch_from_compacted_version_is_gone(kubeapi: KubeApiServer,  # noqa: F811
                                              api: ApiClient) -> None:
    """After compaction a watch from an older version gets an ERROR event with 410."""
    version = create_widget(api, "old")["metadata"]["resourceVersion"]
    kubeapi.compact_watch_history()
    events = list(api.stream(f"{WIDGETS}?watch=true&resourceVersion={version}"))
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410
    assert events[0]["object"]["reason"] == "Expired"


def test_watch_history_size_bounds_replay(tmp_path: Any) -> None:
    """Versions older than the kept history get 410 without explicit compaction."""
    from dbsync.testing.kubeapi import running_apiserver

    with running_apiserver(watch_history_size=2) as server:
        client = client_for(server)
        client.install_widget_crd()
        first = create_widget(client, "h1")["metadata"]["resourceVersion"]
        for name in ("h2", "h3", "h4"):
            create_widget(client, name)
        events = list(client.stream(f"{WIDGETS}?watch=true&resourceVersion={first}"))
    assert events[0]["object"]["code"] == 410


def test_watch_selector_transition_is_seen_as_delete(api: ApiClient) -> None:
    """An object whose labels stop matching is seen as DELETED by a selecting watch."""
    body = widget("sel")
    body["metadata"]["labels"] = {"tier": "web"}
    version = api.call("POST", WIDGETS, body).body["metadata"]["resourceVersion"]
    api.call("PATCH", f"{WIDGETS}/sel", {"metadata": {"labels": {"tier": "db"}}},
             content_type=MERGE)
    events = list(api.stream(f"{WIDGETS}?watch=true&resourceVersion={version}"
                             "&labelSelector=tier%3Dweb&timeoutSeconds=0"))
    assert [event["type"] for event in events] == ["DELETED"]


def test_cluster_wide_watch_sees_all_namespaces(api: ApiClient) -> None:
    """A watch on /apis/{group}/{version}/{plural} receives events of every namespace."""
    version = api.call("GET", WIDGETS).body["metadata"]["resourceVersion"]
    api.call("POST", "/api/v1/namespaces", {"metadata": {"name": "other"}})
    create_widget(api, "here")
    api.call("POST", f"/apis/{GROUP}/{VERSION}/namespaces/other/{PLURAL}",
             {**widget("there"), "metadata": {"name": "there"}})
    events = list(api.stream(f"/apis/{GROUP}/{VERSION}/{PLURAL}?watch=true"
                             f"&resourceVersion={version}&timeoutSeconds=0"))
    assert [event["object"]["metadata"]["namespace"] for event in events] == [
        "default", "other"]


def test_watch_initial_events_end_with_bookmark(api: ApiClient) -> None:
    """sendInitialEvents=true sends current objects, then the initial-events-end bookmark."""
    create_widget(api, "init")
    events = list(api.stream(f"{WIDGETS}?watch=true&sendInitialEvents=true"
                             "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"
                             "&timeoutSeconds=0"))
    assert [event["type"] for event in events][:2] == ["ADDED", "BOOKMARK"]
    annotations = events[1]["object"]["metadata"]["annotations"]
    assert annotations == {"k8s.io/initial-events-end": "true"}


def test_table_watch_sends_table_rows(api: ApiClient) -> None:
    """A watch asking for tables gets one-row Table objects, as kubectl get -w expects."""
    create_widget(api, "tw", replicas=2)
    request = urllib.request.Request(f"{api.base_url}{WIDGETS}?watch=true&timeoutSeconds=0",
                                     headers={"Accept": TABLE})
    with urllib.request.urlopen(request, timeout=5) as response:
        event = json.loads(response.readline())
    assert event["object"]["kind"] == "Table"
    assert event["object"]["rows"][0]["cells"][:4] == ["tw", None, None, 2]


def test_delete_collection_honours_selector(api: ApiClient) -> None:
    """DELETE on a collection removes the objects its selector matches."""
    for name, tier in (("d1", "web"), ("d2", "db")):
        body = widget(name)
        body["metadata"]["labels"] = {"tier": tier}
        api.call("POST", WIDGETS, body)
    reply = api.call("DELETE", f"{WIDGETS}?labelSelector=tier%3Dweb")
    remaining = [item["metadata"]["name"] for item in api.call("GET", WIDGETS).body["items"]]
    assert [item["metadata"]["name"] for item in reply.body["items"]] == ["d1"]
    assert remaining == ["d2"]


# --- request log and write listeners -----------------------------------------------------


def test_requests_log_records_rbac_verbs(kubeapi: KubeApiServer,  # noqa: F811
                                         api: ApiClient) -> None:
    """Requests are logged with RBAC verbs, resource and subresource; the log clears."""
    kubeapi.clear_requests_log()
    create_widget(api, "log")
    api.call("GET", WIDGETS)
    api.call("PATCH", f"{WIDGETS}/log/status", {"status": {}}, content_type=MERGE)
    list(api.stream(f"{WIDGETS}?watch=true&timeoutSeconds=0"))
    records = [(r.verb, r.resource, r.subresource, r.namespace)
               for r in kubeapi.requests_log()]
    assert records == [
        ("create", PLURAL, "", "default"),
        ("list", PLURAL, "", "default"),
        ("patch", PLURAL, "status", "default"),
        ("watch", PLURAL, "", "default"),
    ]
    kubeapi.clear_requests_log()
    assert kubeapi.requests_log() == []


def test_write_listeners_see_commits(kubeapi: KubeApiServer,  # noqa: F811
                                     api: ApiClient) -> None:
    """Sync and async write listeners are called for each committed write."""
    seen: list[tuple[str, str]] = []
    async_seen: list[str] = []

    def on_write(event: WriteEvent) -> None:
        seen.append((event.type.value, event.name))

    async def on_write_async(event: WriteEvent) -> None:
        async_seen.append(event.name)

    kubeapi.add_write_listener(on_write)
    kubeapi.add_write_listener(on_write_async)
    create_widget(api, "lis")
    api.call("DELETE", f"{WIDGETS}/lis")
    time.sleep(0.1)
    assert seen == [("ADDED", "lis"), ("DELETED", "lis")]
    assert async_seen == ["lis", "lis"]


def test_get_object_reads_store(kubeapi: KubeApiServer, api: ApiClient) -> None:  # noqa: F811
    """get_object returns a stored object, or None when absent."""
    create_widget(api, "direct")
    found = kubeapi.get_object(GROUP, VERSION, PLURAL, "default", "direct")
    assert found is not None
    assert found["spec"]["mode"] == "fast"
    assert kubeapi.get_object(GROUP, VERSION, PLURAL, "default", "absent") is None


# --- other clients and entry points ------------------------------------------------------


def test_kubernetes_client_reads_kubeconfig(kubeapi: KubeApiServer,  # noqa: F811
                                            api: ApiClient) -> None:
    """The official kubernetes client works from the written kubeconfig."""
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(kubeapi.kubeconfig_path))
    with api_client:
        custom = client.CustomObjectsApi(api_client)
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                               widget("kc", replicas=2))
        listed = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
        namespaces = client.CoreV1Api(api_client).list_namespace()
    assert [item["spec"]["replicas"] for item in listed["items"]] == [2]
    assert "default" in [item.metadata.name for item in namespaces.items]


def test_async_start_and_stop() -> None:
    """The server starts and stops inside a caller's event loop."""
    import asyncio

    import aiohttp

    async def scenario() -> tuple[int, dict[str, Any]]:
        server = KubeApiServer()
        await server.start()
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    f"{server.url}/api/v1/namespaces/default") as response:
                return response.status, await response.json()
        finally:
            await server.stop()

    status, body = asyncio.run(scenario())
    assert status == 200
    assert body["status"] == {"phase": "Active"}
