"""Label and field selectors as ``?labelSelector=`` and ``?fieldSelector=`` express them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dbsync.testing.kubeapi.errors import bad_request

SET_REQUIREMENT = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
EQUALITY_REQUIREMENT = re.compile(r"^\s*([\w./-]+)\s*(==|!=|=)\s*([\w./-]*)\s*$")


@dataclass(frozen=True)
class Requirement:
    """One clause of a selector: a key, an operator and the values it compares with."""

    key: str
    operator: str  # "=", "!=", "in", "notin", "exists" or "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "=":
            return present and value == self.values[0]
        if self.operator == "!=":
            return not present or value != self.values[0]
        if self.operator == "in":
            return present and value in self.values
        if self.operator == "notin":
            return not present or value not in self.values
        if self.operator == "exists":
            return present
        return not present


def split_clauses(text: str) -> list[str]:
    """Split on commas outside parentheses: ``a in (x,y),b`` has two clauses."""
    clauses: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            clauses.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        clauses.append(current)
    return clauses


def parse_label_selector(text: str | None) -> tuple[Requirement, ...]:
    """Parse a label selector, or raise ``ApiError`` (400) naming an invalid one."""
    if not text:
        return ()
    requirements = []
    for clause in split_clauses(text):
        equality = EQUALITY_REQUIREMENT.match(clause)
        if equality is not None:
            operator = "!=" if equality.group(2) == "!=" else "="
            requirements.append(Requirement(equality.group(1), operator, (equality.group(3),)))
            continue
        matched = SET_REQUIREMENT.match(clause)
        if matched is None:
            raise bad_request(f'unable to parse requirement: invalid label selector "{text}"')
        negated, key, operator, values = matched.groups()
        if operator:
            items = tuple(item.strip() for item in values.split(",") if item.strip())
            requirements.append(Requirement(key, operator, items))
        else:
            requirements.append(Requirement(key, "!" if negated else "exists"))
    return tuple(requirements)


def parse_field_selector(text: str | None) -> tuple[Requirement, ...]:
    """Parse a field selector (``metadata.name=x,status.phase!=Done``)."""
    if not text:
        return ()
    requirements = []
    for clause in split_clauses(text):
        matched = EQUALITY_REQUIREMENT.match(clause)
        if matched is None:
            raise bad_request(f'invalid field selector "{text}"')
        operator = "!=" if matched.group(2) == "!=" else "="
        requirements.append(Requirement(matched.group(1), operator, (matched.group(3),)))
    return tuple(requirements)


def field_value(obj: dict[str, Any], path: str) -> str | None:
    # Why: the Event field label "source" selects source.component.
    if path == "source":
        path = "source.component"
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if value is None or isinstance(value, str):
        return value
    return str(value)


@dataclass(frozen=True)
class Selector:
    """A label selector and a field selector applied together."""

    labels: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, label_text: str | None, field_text: str | None,
              selectable_fields: tuple[str, ...] = ()) -> Selector:
        """Parse both selectors; a field label outside ``selectable_fields`` gives 400."""
        fields = parse_field_selector(field_text)
        allowed = {"metadata.name", "metadata.namespace", *selectable_fields}
        for requirement in fields:
            if requirement.key not in allowed:
                raise bad_request(f'field label not supported: {requirement.key}')
        return cls(parse_label_selector(label_text), fields)

    def matches(self, obj: dict[str, Any]) -> bool:
        metadata = obj.get("metadata", {})
        labels = metadata.get("labels") or {}
        if not all(requirement.matches(labels) for requirement in self.labels):
            return False
        for requirement in self.fields:
            value = field_value(obj, requirement.key)
            fields = {} if value is None else {requirement.key: value}
            # Why: an absent field compares as the empty string in the real server.
            if value is None and requirement.operator == "=":
                fields = {requirement.key: ""}
            if not requirement.matches(fields):
                return False
        return True
