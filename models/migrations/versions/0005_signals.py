"""signals: delivery events carry kind, tenant, stream, From domain and attempt number, with
indexes by time and subject; the tally of recipients not sent now; the hourly roll-up, by
every subject at once (event_rollup) and by each kind of subject (event_rollup_subject)

Revision ID: 0005
Revises: 0004

Existing events get kind 'attempt' and no tenant, stream or domain (they were not recorded).
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveryevent") as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="attempt")
        )
        batch_op.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("stream", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("from_domain", sa.String(length=253), nullable=True))
        batch_op.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
        batch_op.drop_index("ix_deliveryevent_category")
        batch_op.drop_index("ix_deliveryevent_provider")
        batch_op.create_index("ix_deliveryevent_at", ["at"])
        batch_op.create_index("ix_deliveryevent_ip_at", ["source_ip", "at"])
        batch_op.create_index("ix_deliveryevent_provider_at", ["provider", "at"])
        batch_op.create_index("ix_deliveryevent_domain_at", ["from_domain", "at"])
        batch_op.create_index("ix_deliveryevent_stream_at", ["tenant_id", "stream", "at"])
    # The models declare no server defaults (tests/unit/test_migrations.py): drop it again.
    with op.batch_alter_table("deliveryevent") as batch_op:
        batch_op.alter_column("kind", server_default=None)
    op.create_table(
        "hold_tally",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("interval_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("source_ip", sa.String(length=45), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("last_detail", sa.String(length=500), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "interval_start", "reason", "tenant_id", "stream", "provider", "source_ip"
        ),
    )
    op.create_index(
        "ix_hold_tally_stream_at", "hold_tally", ["tenant_id", "stream", "interval_start"]
    )
    op.create_table(
        "event_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("from_domain", sa.String(length=253), nullable=False),
        sa.Column("source_ip", sa.String(length=45), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("permanent", sa.Boolean(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "hour",
            "kind",
            "tenant_id",
            "stream",
            "from_domain",
            "source_ip",
            "provider",
            "category",
            "permanent",
        ),
    )
    op.create_index("ix_event_rollup_hour", "event_rollup", ["hour"])
    op.create_table(
        "event_rollup_subject",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("by", sa.String(length=8), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("subject", sa.String(length=253), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("permanent", sa.Boolean(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_event_rollup_subject_read",
        "event_rollup_subject",
        ["by", "hour", "tenant_id", "subject", "kind", "category", "permanent", "count"],
    )


def downgrade() -> None:
    op.drop_index("ix_event_rollup_subject_read", table_name="event_rollup_subject")
    op.drop_table("event_rollup_subject")
    op.drop_index("ix_event_rollup_hour", table_name="event_rollup")
    op.drop_table("event_rollup")
    op.drop_index("ix_hold_tally_stream_at", table_name="hold_tally")
    op.drop_table("hold_tally")
    with op.batch_alter_table("deliveryevent") as batch_op:
        for name in ("stream_at", "domain_at", "provider_at", "ip_at", "at"):
            batch_op.drop_index(f"ix_deliveryevent_{name}")
        batch_op.create_index("ix_deliveryevent_provider", ["provider"])
        batch_op.create_index("ix_deliveryevent_category", ["category"])
        for column in ("attempt", "from_domain", "stream", "tenant_id", "kind"):
            batch_op.drop_column(column)
