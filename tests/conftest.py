"""Shared fixtures: one real PostgreSQL server per session and fresh databases per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dbsync.testing.servers import TestServer, test_server

# The migrate tests' target fixtures, shared by several test modules.
pytest_plugins = ["tests.migration_fixtures"]

# Fixtures that start a real operator process against the Kubernetes API emulator.
OPERATOR_FIXTURES = frozenset({"cluster", "operator_environment"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by what they use: ``database`` and ``kubernetes``.

    ``database`` marks every test that uses the session's PostgreSQL server; ``kubernetes``
    marks the operator's end-to-end tests. CI's second run, on PostgreSQL 15 over a Unix
    socket, selects ``database and not kubernetes``: the other tests do not touch that
    server, and the end-to-end tests describe databases by network host, as pods reach
    them, which a socket directory cannot be.
    """
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "pg" in fixtures:
            item.add_marker(pytest.mark.database)
        if fixtures & OPERATOR_FIXTURES:
            item.add_marker(pytest.mark.kubernetes)


@pytest.fixture(scope="session")
def pg() -> Iterator[TestServer]:
    """The session's PostgreSQL server (local throwaway, or DBSYNC_TEST_DSN)."""
    with test_server() as server:
        yield server


@pytest.fixture
def make_database(pg: TestServer) -> Iterator[Callable[[str], str]]:
    """Factory that creates an empty database and returns its DSN; all are dropped afterwards."""
    created: list[str] = []

    def create(prefix: str = "t") -> str:
        name = pg.create_database(prefix)
        created.append(name)
        return pg.dsn(name)

    yield create
    for name in created:
        pg.drop_database(name)


@dataclass(frozen=True)
class DatabasePair:
    """A fresh source and target database on the test server."""

    source: str
    target: str


@pytest.fixture
def db_pair(make_database: Callable[[str], str]) -> DatabasePair:
    """A fresh, empty source and target database for one test."""
    return DatabasePair(source=make_database("src"), target=make_database("tgt"))
