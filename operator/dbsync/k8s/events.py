"""Kubernetes Events for DatabaseSync resources.

kopf 1.44 and later no longer turn handler log lines into Events, so the operator posts
them explicitly.  Each Event's reason is the condition reason it accompanies, and its
message carries the sync id, which leads to the audit rows of that sync.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

logger = logging.getLogger("dbsync.k8s.events")

NORMAL = "Normal"
WARNING = "Warning"

# The API server rejects Event messages longer than 1 KiB.
MAX_EVENT_MESSAGE_CHARACTERS = 1024


def post_event(body: Mapping[str, Any], *, event_type: str, reason: str, message: str) -> None:
    """Queue one Event about ``body``; kopf posts it in the background."""
    text = message if len(message) <= MAX_EVENT_MESSAGE_CHARACTERS else (
        message[:MAX_EVENT_MESSAGE_CHARACTERS - 3] + "...")
    try:
        kopf.event(cast(kopf.Body, dict(body)), type=event_type, reason=reason, message=text)
    except LookupError:
        # Outside kopf's operator context (unit tests, scripts) there is no event queue.
        logger.debug("no kopf event queue; Event %s %s not posted", event_type, reason)
