"""dbsync's own Alembic history: the audit tables, versioned in dbsync_alembic_version."""
