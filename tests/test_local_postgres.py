"""LocalPostgres, the throwaway server the tests and benchmarks start, on this machine."""

from __future__ import annotations

import psycopg
import pytest

from dbsync.testing.postgres import LocalPostgres


def test_fresh_object_stops_running_server() -> None:
    """A second object on the same directory stops the server, also when run as root."""
    server = LocalPostgres()
    server.__enter__()
    try:
        attached = LocalPostgres(base_dir=server.base_dir, port=server.port)
        attached.stop()

        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn("postgres"), connect_timeout=2).close()
    finally:
        server.__exit__(None, None, None)
