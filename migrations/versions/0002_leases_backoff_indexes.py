"""Account leases (one worker per account), account backoff, and lookup indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("account", sa.String(200), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("failures", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("backoff_until", sa.DateTime(timezone=True)))
    op.create_index("ix_messages_message_id", "messages", ["message_id"])
    op.create_index("ix_sightings_state", "sightings", ["state"])


def downgrade() -> None:
    op.drop_index("ix_sightings_state", "sightings")
    op.drop_index("ix_messages_message_id", "messages")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("backoff_until")
        batch.drop_column("failures")
    op.drop_table("leases")
