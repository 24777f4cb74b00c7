"""jobs.task_id: the Celery task (message) that last carried the job, for Flower look-ups;
jobs.held_at: when a worker last said it holds the job's message unclaimed

Revision ID: 0005_task_id
Revises: 0004_ops
"""
import sqlalchemy as sa
from alembic import op


revision = "0005_task_id"
down_revision = "0004_ops"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("task_id", sa.String(200), nullable=True))
    op.add_column("jobs", sa.Column("held_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("held_at")
        batch.drop_column("task_id")
