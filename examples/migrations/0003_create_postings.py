"""Create postings: one row per leg, with a debit/credit side column.

Revision ID: 0003_postings
Revises: 0002_transactions
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_postings"
down_revision = "0002_transactions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "postings",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("transaction_id", sa.BigInteger, sa.ForeignKey("transactions.id"),
                  nullable=False),
        sa.Column("account_id", sa.BigInteger, sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("side", sa.String(1), nullable=False),
        sa.Column("amount", sa.Numeric(18, 2), nullable=False),
        sa.Column("posted_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("postings")
