"""dbsync: bring a PostgreSQL target to its source's migration state and audit every step.

The target is then checked against the source's schema and for ledger integrity.
"""

__version__ = "0.1.0"
SERVICE_NAME = "dbsync"
