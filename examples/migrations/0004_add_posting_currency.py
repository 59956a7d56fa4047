"""Add a currency to each posting (ISO 4217 code), defaulting existing rows to EUR.

Revision ID: 0004_currency
Revises: 0003_postings
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_currency"
down_revision = "0003_postings"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("postings", sa.Column("currency", sa.CHAR(3), nullable=False,
                                        server_default="EUR"))
    op.add_column("accounts", sa.Column("currency", sa.CHAR(3), nullable=False,
                                        server_default="EUR"))


def downgrade() -> None:
    op.drop_column("accounts", "currency")
    op.drop_column("postings", "currency")
