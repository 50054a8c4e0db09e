"""warm-up: plans for an IP or a new sending domain, their stage per provider, and messages
marked as warm-up candidates

Revision ID: 0009
Revises: 0008

A WarmupPlan covers an IP (ip_id) or a domain (domain_id); it records its stage per provider,
the providers whose stage holds and why, which messages it takes, and when it was last judged
and last advanced. Messages carry whether the customer marked them for an engaged recipient.
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("warmupplan") as batch_op:
        batch_op.alter_column("ip_id", existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(sa.Column("domain_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key("fk_warmupplan_domain_id", "domain", ["domain_id"], ["id"])
        batch_op.create_index("ix_warmupplan_domain_id", ["domain_id"])
        batch_op.add_column(
            sa.Column(
                "reason",
                sqlmodel.sql.sqltypes.AutoString(length=32),
                nullable=False,
                server_default="new",
            )
        )
        batch_op.add_column(sa.Column("stages", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("held", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(
            sa.Column(
                "candidates",
                sqlmodel.sql.sqltypes.AutoString(length=8),
                nullable=False,
                server_default="all",
            )
        )
        batch_op.add_column(sa.Column("evaluated_on", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("progressed_on", sa.Date(), nullable=True))
    with op.batch_alter_table("message") as batch_op:
        batch_op.add_column(
            sa.Column("warmup_candidate", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # The defaults filled existing rows; from here on the models' defaults apply, as for
    # every other column.
    with op.batch_alter_table("warmupplan") as batch_op:
        for column in ("reason", "stages", "held", "candidates"):
            batch_op.alter_column(column, server_default=None)
    with op.batch_alter_table("message") as batch_op:
        batch_op.alter_column("warmup_candidate", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("message") as batch_op:
        batch_op.drop_column("warmup_candidate")
    with op.batch_alter_table("warmupplan") as batch_op:
        for column in ("progressed_on", "evaluated_on", "candidates", "held", "stages", "reason"):
            batch_op.drop_column(column)
        batch_op.drop_index("ix_warmupplan_domain_id")
        batch_op.drop_constraint("fk_warmupplan_domain_id", type_="foreignkey")
        batch_op.drop_column("domain_id")
        batch_op.alter_column("ip_id", existing_type=sa.Integer(), nullable=False)
