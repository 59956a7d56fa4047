"""Add dbsync_revision_checksums: the SHA-256 of every applied application revision file.

Revision ID: 0002_revision_checksums
Revises: 0001_audit_log

The migrate step compares these checksums with the files on disk before it applies
anything, so an edited, already-applied revision is caught. ``applied_at`` is NULL for
revisions that were applied before dbsync recorded checksums for the database.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_revision_checksums"
down_revision = "0001_audit_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dbsync_revision_checksums",
        sa.Column("revision", sa.Text(), primary_key=True),
        sa.Column("file_name", sa.Text(), nullable=False),
        sa.Column("sha256", sa.CHAR(64), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.Column("sync_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'",
                           name="dbsync_revision_checksums_sha256_hex"),
    )


def downgrade() -> None:
    op.drop_table("dbsync_revision_checksums")
