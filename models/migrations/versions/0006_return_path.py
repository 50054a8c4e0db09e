"""return path: a sending domain's return-path subdomain and when it was found published

Revision ID: 0006
Revises: 0005

Existing domains get none: their mail keeps the relay's own bounce domain in MAIL FROM.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("domain") as batch_op:
        batch_op.add_column(sa.Column("return_path_domain", sa.String(length=253), nullable=True))
        batch_op.add_column(
            sa.Column("return_path_published_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("domain") as batch_op:
        batch_op.drop_column("return_path_published_at")
        batch_op.drop_column("return_path_domain")
