"""users, API keys, and an owner for every job

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00.000000
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Jobs stored before keys existed (none in any known deployment) go to this user, whom an
# admin can see; the column is NOT NULL afterwards either way.
LEGACY_USER = "legacy"


def upgrade() -> None:
    users = op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", app.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", app.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_user_id"), ["user_id"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_id", sa.Uuid(), nullable=True))

    conn = op.get_bind()
    if conn.execute(sa.text("SELECT 1 FROM jobs LIMIT 1")).first() is not None:
        legacy = uuid.uuid4()
        op.bulk_insert(
            users, [{"id": legacy, "name": LEGACY_USER, "is_admin": False, "created_at": app.models.utcnow()}]
        )
        jobs = sa.table("jobs", sa.column("owner_id", sa.Uuid()))
        conn.execute(jobs.update().values(owner_id=legacy))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("owner_id", existing_type=sa.Uuid(), nullable=False)
        batch_op.create_index(batch_op.f("ix_jobs_owner_id"), ["owner_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_jobs_owner_id_users"), "users", ["owner_id"], ["id"])
        # An Idempotency-Key is scoped to its user.
        batch_op.drop_constraint(batch_op.f("uq_jobs_idempotency_key"), type_="unique")
        batch_op.create_unique_constraint("uq_jobs_owner_id_idempotency_key", ["owner_id", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_jobs_owner_id_idempotency_key", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_jobs_idempotency_key"), ["idempotency_key"])
        batch_op.drop_constraint(batch_op.f("fk_jobs_owner_id_users"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_owner_id"))
        batch_op.drop_column("owner_id")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_user_id"))
    op.drop_table("api_keys")
    op.drop_table("users")
