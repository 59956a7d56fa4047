"""dbsync: bring a PostgreSQL target to its source's migration state, check it, and audit every step."""

__version__ = "0.1.0"
SERVICE_NAME = "dbsync"
