"""onboarding: key rotation states, unique selectors, DNS check time, declared stream volume

Revision ID: 0007
Revises: 0006

DKIM keys gain the `retiring` state (still published, no longer signing: a rotation's
overlap), when they began signing and when a retiring key is withdrawn; (domain, selector)
becomes unique. Domains record when their DNS was last checked. Streams record what the
customer declared at onboarding (kind, volume, sending days, list source and age).
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

KEY_STATES = ("pending", "active", "retiring", "retired")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # PostgreSQL 12+ adds an enum value inside a transaction (not usable before commit)
        op.execute("ALTER TYPE keystate ADD VALUE IF NOT EXISTS 'retiring' AFTER 'active'")
    with op.batch_alter_table("dkimkey") as batch_op:
        if op.get_bind().dialect.name != "postgresql":
            batch_op.alter_column(
                "state",
                existing_type=sa.Enum("pending", "active", "retired", name="keystate"),
                type_=sa.Enum(*KEY_STATES, name="keystate"),
                existing_nullable=False,
            )
        batch_op.add_column(sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("retire_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_unique_constraint(
            "uq_dkimkey_domain_id_selector", ["domain_id", "selector"]
        )
    with op.batch_alter_table("domain") as batch_op:
        batch_op.add_column(sa.Column("dns_checked_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("stream") as batch_op:
        batch_op.add_column(
            sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True)
        )
        batch_op.add_column(sa.Column("declared_per_day", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("declared_per_month", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("sending_days_per_week", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("list_source", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True)
        )
        batch_op.add_column(sa.Column("list_age_months", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("declared_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stream") as batch_op:
        for column in (
            "declared_at",
            "list_age_months",
            "list_source",
            "sending_days_per_week",
            "declared_per_month",
            "declared_per_day",
            "kind",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("domain") as batch_op:
        batch_op.drop_column("dns_checked_at")
    with op.batch_alter_table("dkimkey") as batch_op:
        batch_op.drop_constraint("uq_dkimkey_domain_id_selector", type_="unique")
        batch_op.drop_column("retire_at")
        batch_op.drop_column("activated_at")
    # PostgreSQL cannot drop an enum value; a retiring key reads as retired after a downgrade
    op.execute("UPDATE dkimkey SET state = 'retired' WHERE state = 'retiring'")
