"""Schema diff: proves that a target has the same schema as its source, or lists what differs.

:func:`introspect` reads one database's catalog into a :class:`Schema` snapshot
(``diff_catalog``), :func:`compare` matches two snapshots object by object (``diff_compare``),
and :func:`diff_databases` does both for two DSNs. The ``dbsync diff`` command and the sync
pipeline's diff step call :func:`diff_databases`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from dbsync.pipeline import dsn as dsn_module
from dbsync.pipeline.diff_catalog import (
    CatalogObject,
    Schema,
    SchemaIntrospectionError,
    garbage_collection_paused,
    introspect,
)
from dbsync.pipeline.diff_compare import (
    DEFAULT_OPTIONS,
    IGNORABLE_KINDS,
    Difference,
    DiffOptions,
    DiffResult,
    Hazard,
    Severity,
    compare,
)

__all__ = [
    "IGNORABLE_KINDS",
    "CatalogObject",
    "DiffOptions",
    "DiffResult",
    "Difference",
    "Hazard",
    "Schema",
    "SchemaIntrospectionError",
    "Severity",
    "compare",
    "diff_databases",
    "introspect",
    "introspect_dsn",
]

logger = logging.getLogger("dbsync.diff")


def introspect_dsn(dsn: str, *, role: str, connect_timeout_seconds: int) -> Schema:
    """Connect to ``dsn`` as ``role`` ("source" or "target") and read its schema."""
    connection = dsn_module.connect(
        dsn, role=role, connect_timeout_seconds=connect_timeout_seconds)
    with connection:
        return introspect(connection)


def diff_databases(*, source_dsn: str, target_dsn: str,
                   options: DiffOptions = DEFAULT_OPTIONS) -> DiffResult:
    """Read both schemas and compare them, raising a DbsyncError when either read fails."""
    started = time.perf_counter()

    # The two catalogs are read in parallel: each read waits mostly on its own server. The
    # collector pause covers both threads, which would otherwise end each other's pause.
    with garbage_collection_paused(), ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="dbsync-diff") as pool:
        source_future = pool.submit(
            introspect_dsn, source_dsn, role="source",
            connect_timeout_seconds=options.connect_timeout_seconds)
        target_future = pool.submit(
            introspect_dsn, target_dsn, role="target",
            connect_timeout_seconds=options.connect_timeout_seconds)
        source = source_future.result()
        target = target_future.result()
        result = compare(source, target, options)

    logger.info(
        "compared %s with %s: %d differences in %.3f s",
        dsn_module.describe(source_dsn, role="source"),
        dsn_module.describe(target_dsn, role="target"),
        len(result.differences), time.perf_counter() - started)
    return result
