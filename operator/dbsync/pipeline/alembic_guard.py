"""The process-wide lock that serializes every Alembic run in this process.

Alembic's ``alembic.context`` and ``alembic.op`` are module-level proxies bound to the run in
progress, so two runs in threads of one process would read each other's migration context.
Hold :data:`ALEMBIC_PROCESS_LOCK` around any ``alembic.command`` call or ``MigrationContext``
use: dbsync's own-schema upgrade and the migrate step both take it.
"""

from __future__ import annotations

import threading

ALEMBIC_PROCESS_LOCK = threading.Lock()
