"""sample_requests: on-demand draws from a checkpoint

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sample_requests",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("checkpoint_step", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("sampler", sa.String(length=8), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("png_path", sa.String(length=1024), nullable=True),
        sa.Column("png_sha256", sa.String(length=64), nullable=True),
        sa.Column("npz_path", sa.String(length=1024), nullable=True),
        sa.Column("npz_sha256", sa.String(length=64), nullable=True),
        sa.Column("created_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", app.models.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed')", name=op.f("ck_sample_requests_status_valid")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_sample_requests_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sample_requests")),
    )
    with op.batch_alter_table("sample_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sample_requests_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sample_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sample_requests_job_id"))
    op.drop_table("sample_requests")
