"""sample_requests.worker: which worker draws a running request (so a dead one's can be re-queued)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sample_requests", sa.Column("worker", sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column("sample_requests", "worker")
