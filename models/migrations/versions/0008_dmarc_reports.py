"""dmarc reports: DMARC aggregate reports received at the rua address, one row per report
(unique per reporting organisation and report id) and one per record, indexed by published
domain, source IP and report period

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dmarc_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_name", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=False),
        sa.Column("report_id", sa.String(length=255), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("begin", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("p", sa.String(length=32), nullable=True),
        sa.Column("sp", sa.String(length=32), nullable=True),
        sa.Column("adkim", sa.String(length=32), nullable=True),
        sa.Column("aspf", sa.String(length=32), nullable=True),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("org_name", "report_id"),
    )
    op.create_index("ix_dmarc_report_domain_begin", "dmarc_report", ["domain", "begin"])
    op.create_table(
        "dmarc_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("begin", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_ip", sa.String(length=45), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("disposition", sa.String(length=32), nullable=False),
        sa.Column("dkim", sa.String(length=32), nullable=False),
        sa.Column("spf", sa.String(length=32), nullable=False),
        sa.Column("header_from", sa.String(length=253), nullable=False),
        sa.Column("envelope_from", sa.String(length=253), nullable=True),
        sa.Column("dkim_results", sa.JSON(), nullable=False),
        sa.Column("spf_domain", sa.String(length=253), nullable=True),
        sa.Column("spf_result", sa.String(length=32), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["dmarc_report.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dmarc_record_report_id", "dmarc_record", ["report_id"])
    op.create_index(
        "ix_dmarc_record_domain_ip_begin", "dmarc_record", ["domain", "source_ip", "begin"]
    )
    op.create_index("ix_dmarc_record_ip_begin", "dmarc_record", ["source_ip", "begin"])


def downgrade() -> None:
    op.drop_index("ix_dmarc_record_ip_begin", table_name="dmarc_record")
    op.drop_index("ix_dmarc_record_domain_ip_begin", table_name="dmarc_record")
    op.drop_index("ix_dmarc_record_report_id", table_name="dmarc_record")
    op.drop_table("dmarc_record")
    op.drop_index("ix_dmarc_report_domain_begin", table_name="dmarc_report")
    op.drop_table("dmarc_report")
