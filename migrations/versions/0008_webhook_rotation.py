"""webhook endpoints keep their previous secret for a while after a rotation

Revision ID: 0008_webhook_rotation
Revises: 0007_webhooks
"""
import sqlalchemy as sa
from alembic import op


revision = "0008_webhook_rotation"
down_revision = "0007_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("previous_secret", sa.String(100), nullable=True))
        batch.add_column(sa.Column("previous_secret_expires_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("previous_secret_expires_at")
        batch.drop_column("previous_secret")
