"""admission-control indexes: backlog per key, drain rate per model

Revision ID: 0004_ops
Revises: 0002_batches
"""
from alembic import op


revision = "0004_ops"
down_revision = "0002_batches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_status", "jobs", ["owner", "status"])
    op.create_index("ix_jobs_model_finished_at", "jobs", ["model", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_model_finished_at", table_name="jobs")
    op.drop_index("ix_jobs_owner_status", table_name="jobs")
