"""Constrain postings (side, positive amount) and index them by transaction.

The covering index lets the ledger's per-transaction balance check run as an index-only scan.

Revision ID: 0005_checks_index
Revises: 0004_currency
"""

from alembic import op

revision = "0005_checks_index"
down_revision = "0004_currency"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_check_constraint("postings_side_valid", "postings", "side IN ('D', 'C')")
    op.create_check_constraint("postings_amount_positive", "postings", "amount > 0")
    op.create_check_constraint("accounts_normal_side_valid", "accounts",
                               "normal_side IN ('D', 'C')")
    op.create_index(
        "postings_transaction_covering",
        "postings",
        ["transaction_id", "currency"],
        postgresql_include=["side", "amount"],
    )
    op.create_index("postings_account", "postings", ["account_id"])


def downgrade() -> None:
    op.drop_index("postings_account", table_name="postings")
    op.drop_index("postings_transaction_covering", table_name="postings")
    op.drop_constraint("accounts_normal_side_valid", "accounts")
    op.drop_constraint("postings_amount_positive", "postings")
    op.drop_constraint("postings_side_valid", "postings")
