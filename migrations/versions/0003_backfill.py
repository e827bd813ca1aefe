"""Indexes for the status queries and the backfill on ledgers of millions of rows.

- sightings (folder_id, uidvalidity, state): the counts per folder and state that
  `status` shows are read from this index alone (measured: bench/status_bench.py);
- deliveries (tenant, message_ref, vault, delivered_at): the summary line per tenant
  (messages, vaults, last upload) without reading the table;
- runs (started_at): `status --runs` over every account, newest first.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_sightings_folder_uv_state", "sightings", ["folder_id", "uidvalidity", "state"])
    op.create_index("ix_deliveries_tenant", "deliveries", ["tenant", "message_ref", "vault", "delivered_at"])
    op.create_index("ix_runs_started", "runs", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_started", "runs")
    op.drop_index("ix_deliveries_tenant", "deliveries")
    op.drop_index("ix_sightings_folder_uv_state", "sightings")
