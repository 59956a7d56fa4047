"""The test fixtures give each test real, separate PostgreSQL databases."""

import psycopg

from tests.conftest import DatabasePair


def test_db_pair_databases_are_distinct_and_empty(db_pair: DatabasePair) -> None:
    """Source and target are two different, empty databases on a live server."""
    with psycopg.connect(db_pair.source) as source, psycopg.connect(db_pair.target) as target:
        source_name = source.execute("SELECT current_database()").fetchone()
        target_name = target.execute("SELECT current_database()").fetchone()
        assert source_name != target_name
        tables = target.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)
