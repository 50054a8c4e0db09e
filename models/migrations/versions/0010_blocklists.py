"""blocklists: what each DNS blocklist last said about a sending IP or domain, one row per
(target, list), unique, indexed by state (listed | clear)

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blocklist_listing",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=253), nullable=False),
        sa.Column("target_kind", sa.String(length=8), nullable=False),
        sa.Column("list_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("codes", sa.JSON(), nullable=False),
        sa.Column("meaning", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("target", "list_id"),
    )
    op.create_index("ix_blocklist_listing_state", "blocklist_listing", ["state"])


def downgrade() -> None:
    op.drop_index("ix_blocklist_listing_state", table_name="blocklist_listing")
    op.drop_table("blocklist_listing")
