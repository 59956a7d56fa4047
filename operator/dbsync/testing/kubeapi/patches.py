"""Patch formats the API server accepts: JSON merge patch, JSON patch and strategic merge patch.

Strategic merge patch is implemented for the list merge keys of the built-in kinds dbsync's
manifests use (containers by ``name``, ports by ``containerPort``, and so on) and its
``$patch``, ``$retainKeys``, ``$setElementOrder`` and ``$deleteFromPrimitiveList``
directives. For custom resources the real server rejects strategic merge patch with 415, and
so does this emulator.
"""

from __future__ import annotations

import copy
from typing import Any

from dbsync.testing.kubeapi.errors import ApiError, bad_request

# Field name -> merge key for lists of objects in the built-in kinds (from the Kubernetes
# API's patchMergeKey tags). Lists not named here are replaced whole, as atomic lists are.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "tolerations": "key",
    "conditions": "type",
    "ownerReferences": "uid",
    "secrets": "name",
}
# Lists of scalars that strategic merge patch merges as sets.
SET_LISTS = frozenset({"finalizers"})


def unprocessable(message: str) -> ApiError:
    return ApiError(code=422, reason="Invalid", message=message)


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch and return the result (inputs are not modified)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- JSON patch (RFC 6902) ---------------------------------------------------------------


def split_pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise bad_request(f'invalid JSON pointer "{pointer}": it must start with "/"')
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def resolve_parent(document: Any, parts: list[str], pointer: str) -> Any:
    current = document
    for part in parts[:-1]:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise unprocessable(f"doc is missing path: \"{pointer}\": missing value")
    return current


def get_at(document: Any, pointer: str) -> Any:
    parts = split_pointer(pointer)
    if not parts:
        return document
    parent = resolve_parent(document, parts, pointer)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise unprocessable(f"doc is missing path: \"{pointer}\": missing value")


def add_at(document: Any, pointer: str, value: Any) -> Any:
    parts = split_pointer(pointer)
    if not parts:
        return value
    parent = resolve_parent(document, parts, pointer)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise unprocessable(f"add operation does not apply: doc is missing path: "
                                f"\"{pointer}\": missing value")
    else:
        raise unprocessable(f"doc is missing path: \"{pointer}\": missing value")
    return document


def remove_at(document: Any, pointer: str) -> tuple[Any, Any]:
    parts = split_pointer(pointer)
    parent = resolve_parent(document, parts, pointer)
    last = parts[-1] if parts else ""
    if isinstance(parent, dict) and last in parent:
        return document, parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return document, parent.pop(int(last))
    raise unprocessable(f"remove operation does not apply: doc is missing path: \"{pointer}\": "
                        "missing value")


def json_patch(target: Any, operations: Any) -> Any:
    """Apply an RFC 6902 JSON patch and return the result. A failed ``test`` raises 422."""
    if not isinstance(operations, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    document = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation:
            raise bad_request(f"invalid JSON patch operation: {operation!r}")
        op = operation["op"]
        path = operation.get("path", "")
        if op == "add":
            document = add_at(document, path, copy.deepcopy(operation.get("value")))
        elif op == "remove":
            document, _ = remove_at(document, path)
        elif op == "replace":
            get_at(document, path)
            document, _ = remove_at(document, path) if split_pointer(path) else (None, None)
            document = add_at(document, path, copy.deepcopy(operation.get("value")))
        elif op == "move":
            document, value = remove_at(document, operation.get("from", ""))
            document = add_at(document, path, value)
        elif op == "copy":
            value = copy.deepcopy(get_at(document, operation.get("from", "")))
            document = add_at(document, path, value)
        elif op == "test":
            if get_at(document, path) != operation.get("value"):
                raise unprocessable(f"testing value {path} failed: test failed")
        else:
            raise bad_request(f'unexpected kind of JSON patch operation: "{op}"')
    return document


# --- strategic merge patch ---------------------------------------------------------------


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Apply a strategic merge patch to a built-in object and return the result."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {key: copy.deepcopy(value) for key, value in patch.items() if key != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}

    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        for key in list(result):
            if key not in retain:
                del result[key]

    for key, value in patch.items():
        if key in ("$retainKeys", "$patch") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field_name = key.split("/", 1)[1]
            if isinstance(result.get(field_name), list) and isinstance(value, list):
                result[field_name] = [item for item in result[field_name] if item not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = merge_list(key, result.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def merge_list(name: str, current: Any, patch: list[Any]) -> list[Any]:
    if not isinstance(current, list):
        current = []
    merge_key = MERGE_KEYS.get(name)
    if name in SET_LISTS:
        merged = list(current)
        for item in patch:
            if item not in merged:
                merged.append(item)
        return merged
    if merge_key is None or not all(isinstance(item, dict) for item in patch):
        return [item for item in copy.deepcopy(patch)
                if not (isinstance(item, dict) and item.get("$patch"))]
    if any(item.get("$patch") == "replace" for item in patch):
        return [item for item in copy.deepcopy(patch) if item.get("$patch") != "replace"]

    merged = copy.deepcopy(current)
    for item in patch:
        key_value = item.get(merge_key)
        position = next(
            (index for index, existing in enumerate(merged)
             if isinstance(existing, dict) and existing.get(merge_key) == key_value),
            None,
        )
        if item.get("$patch") == "delete":
            if position is not None:
                merged.pop(position)
            continue
        if position is None:
            merged.append(strategic_merge_patch({}, item))
        else:
            merged[position] = strategic_merge_patch(merged[position], item)
    return merged
