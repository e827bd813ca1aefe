"""The ledger's first schema: accounts, folders, messages, sightings, deliveries, runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("username", sa.String(320), nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("last_error_at", sa.DateTime(timezone=True)),
        sa.Column("last_success_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "folders",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("name", sa.String(1000), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger),
        sa.Column("last_uid", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("uidnext", sa.BigInteger),
        sa.Column("highestmodseq", sa.BigInteger),
        sa.Column("last_sync_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.Text),
        sa.UniqueConstraint("account_id", "name", name="uq_folders_account_name"),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(100), nullable=False, unique=True),
        sa.Column("message_id", sa.Text),
        sa.Column("fingerprint", sa.String(100)),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("date", sa.Text),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True)),
        sa.Column("upload_id", sa.String(200)),
    )
    op.create_index("ix_messages_state", "messages", ["state"])
    op.create_table(
        "sightings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("folder_id", sa.Integer, sa.ForeignKey("folders.id"), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger, nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("message_ref", sa.Integer, sa.ForeignKey("messages.id")),
        sa.Column("message_id", sa.Text),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64)),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("folder_id", "uidvalidity", "uid", name="uq_sightings_place"),
    )
    op.create_index("ix_sightings_message", "sightings", ["message_ref"])
    op.create_index("ix_sightings_folder_state", "sightings", ["folder_id", "state"])
    op.create_table(
        "deliveries",
        sa.Column("message_ref", sa.Integer, sa.ForeignKey("messages.id"), primary_key=True),
        sa.Column("vault", sa.String(320), primary_key=True),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("upload_id", sa.String(200)),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("account", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("outcome", sa.String(16)),
        sa.Column("uploaded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("duplicate", sa.Integer, nullable=False, server_default="0"),
        sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("pending", sa.Integer, nullable=False, server_default="0"),
        sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_runs_account_started", "runs", ["account", "started_at"])


def downgrade() -> None:
    for table in ("runs", "deliveries", "sightings", "messages", "folders", "accounts"):
        op.drop_table(table)
