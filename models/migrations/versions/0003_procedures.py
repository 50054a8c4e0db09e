"""procedures: durable state of each Protocol procedure and the steps it has done

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "procedure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("deployment", sa.String(length=128), nullable=True),
        sa.Column("runbook_id", sa.String(length=64), nullable=False),
        sa.Column("runbook_version", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("waiting_for", sa.String(length=255), nullable=True),
        sa.Column("approval_id", sa.Integer(), nullable=True),
        sa.Column("wait_key", sa.String(length=128), nullable=True),
        sa.Column("wait_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wait_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("woken_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wakes", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["approval_id"], ["approval.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_procedure_name", "procedure", ["name"])
    op.create_index("ix_procedure_state", "procedure", ["state"])
    op.create_index("ix_procedure_wait_until", "procedure", ["wait_until"])
    op.create_index("ix_procedure_flow_run_id", "procedure", ["flow_run_id"])
    op.create_table(
        "procedure_step",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("procedure_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(length=128), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["procedure_id"], ["procedure.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("procedure_id", "step"),
    )
    op.create_index("ix_procedure_step_procedure_id", "procedure_step", ["procedure_id"])


def downgrade() -> None:
    op.drop_table("procedure_step")
    op.drop_table("procedure")
