"""Add a settlement status to transactions as an enum type.

Revision ID: 0006_txn_status
Revises: 0005_checks_index
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006_txn_status"
down_revision = "0005_checks_index"
branch_labels = None
depends_on = None

# The type is created with plain SQL so that offline (plan) mode renders it too.
settlement_status = postgresql.ENUM("pending", "settled", "reversed", name="settlement_status",
                                    create_type=False)


def upgrade() -> None:
    op.execute("CREATE TYPE settlement_status AS ENUM ('pending', 'settled', 'reversed')")
    op.add_column("transactions", sa.Column("status", settlement_status, nullable=False,
                                            server_default="settled"))


def downgrade() -> None:
    op.drop_column("transactions", "status")
    op.execute("DROP TYPE settlement_status")
