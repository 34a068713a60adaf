"""Rollouts: deployments and their per-device state (issue 14, item 5).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Time: sa.Double[float] = sa.Double()


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("target", Json, nullable=False),
        sa.Column("canary", sa.String(16), nullable=False),
        sa.Column("wave_size", sa.String(16)),
        sa.Column("abort_threshold", sa.String(16), nullable=False),
        sa.Column("wave_timeout_s", Time, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("waves", sa.Integer, nullable=False),
        sa.Column("current_wave", sa.Integer, nullable=False, server_default="0"),
        sa.Column("wave_started_at", Time),
        sa.Column("accepted_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("created_by", sa.String(128)),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("finished_at", Time),
        sa.Column("reason", sa.Text),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_until", Time),
        sa.PrimaryKeyConstraint("id", name="pk_deployments"),
    )
    op.create_index("ix_deployments_status", "deployments", ["status"])
    op.create_index("ix_deployments_created_at", "deployments", ["created_at"])
    op.create_table(
        "deployment_devices",
        sa.Column("deployment_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("command_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("sent_at", Time),
        sa.Column("finished_at", Time),
        sa.Column("error", Json),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE",
                                name="fk_deployment_devices_deployment_id_deployments"),
        sa.PrimaryKeyConstraint("deployment_id", "device_id", name="pk_deployment_devices"),
        sa.UniqueConstraint("command_id", name="uq_deployment_devices_command_id"),
    )
    op.create_index("ix_deployment_devices_deployment_id_wave", "deployment_devices", ["deployment_id", "wave"])


def downgrade() -> None:
    op.drop_table("deployment_devices")
    op.drop_table("deployments")
