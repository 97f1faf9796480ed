"""sample_requests.dispatched_at: when the request's task was handed to the broker (null: not yet)

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Requests stored before this revision were sent when they were made (or deleted).
    op.add_column("sample_requests", sa.Column("dispatched_at", app.models.UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE sample_requests SET dispatched_at = created_at")


def downgrade() -> None:
    op.drop_column("sample_requests", "dispatched_at")
