"""bulk batches: index jobs (batch_id, id) for a batch's lines in order

Output files, result pages and retries walk one batch's jobs by id (= input line order).

Revision ID: 0002_batches
Revises: 0001
"""
from alembic import op


revision = "0002_batches"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_batch_id_id", ["batch_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_batch_id_id")
