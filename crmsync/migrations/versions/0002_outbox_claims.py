"""Outbox claims: concurrent workers lease batches of pending rows (scale-out on PostgreSQL).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("crm_outbox", sa.Column("claimed_by", sa.String(), nullable=True))
    op.add_column("crm_outbox", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("crm_outbox") as batch:
        batch.drop_column("claimed_at")
        batch.drop_column("claimed_by")
