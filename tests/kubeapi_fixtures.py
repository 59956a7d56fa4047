"""The ``kubeapi`` fixture: a fresh Kubernetes API emulator per test, with a kubeconfig.

Import it into a test module with ``from tests.kubeapi_fixtures import kubeapi  # noqa: F401``.
The server runs in a background thread, so synchronous clients (kubectl, the ``kubernetes``
client) and kopf's own event loop can all talk to it from the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dbsync.testing.kubeapi import KubeApiServer, running_apiserver


@pytest.fixture
def kubeapi(tmp_path: Path) -> Iterator[KubeApiServer]:
    """A started emulator; its kubeconfig is at ``kubeapi.kubeconfig_path``."""
    with running_apiserver(kubeconfig_path=tmp_path / "kubeconfig") as server:
        yield server
