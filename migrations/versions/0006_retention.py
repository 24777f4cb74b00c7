"""tenants and retention: key weights and quotas, line cost, output expiry, purge indexes

Revision ID: 0006_retention
Revises: 0004_ops
"""
import sqlalchemy as sa
from alembic import op


revision = "0006_retention"
down_revision = "0005_task_id"
branch_labels = None
depends_on = None

KEY_COLUMNS = (
    ("weight", sa.Float()),
    ("quota_queued_lines", sa.Integer()),
    ("quota_queued_tokens", sa.Integer()),
    ("quota_file_bytes", sa.Integer()),
)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cost_tokens", sa.Integer(), nullable=True))
    op.add_column("batches", sa.Column("output_expires_after_s", sa.Integer(), nullable=True))
    # The queue namespace of the API that accepted the batch: its lines are dispatched there.
    op.add_column("batches", sa.Column("queue_prefix", sa.String(100), nullable=True))
    for name, type_ in KEY_COLUMNS:
        op.add_column("api_keys", sa.Column(name, type_, nullable=True))
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    op.create_index("ix_files_expires_at", "files", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_files_expires_at", table_name="files")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    with op.batch_alter_table("api_keys") as batch:
        for name, _ in reversed(KEY_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("queue_prefix")
        batch.drop_column("output_expires_after_s")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cost_tokens")
