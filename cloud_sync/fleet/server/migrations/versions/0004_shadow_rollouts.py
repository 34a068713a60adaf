"""Shadow rollouts (issue 16): a deployment's mode and shadow arguments, and the operator's promote or discard.

Revision ID: 0004
Revises: 0003

Existing deployments become ``swap`` (the only mode before). Each device of a shadow rollout records the
action sent to it (``promote`` or ``discard``) with that command's id; its outcome is the command's, which
ingestion stores in ``commands`` as for any command.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Time: sa.Double[float] = sa.Double()


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("mode", sa.String(16), nullable=False, server_default="swap"))
        batch.add_column(sa.Column("shadow", Json))
        batch.add_column(sa.Column("action", sa.String(16)))
        batch.add_column(sa.Column("action_by", sa.String(128)))
        batch.add_column(sa.Column("action_at", Time))
    with op.batch_alter_table("deployment_devices") as batch:
        batch.add_column(sa.Column("action", sa.String(16)))
        batch.add_column(sa.Column("action_id", sa.String(64)))
        batch.add_column(sa.Column("action_at", Time))


def downgrade() -> None:
    with op.batch_alter_table("deployment_devices") as batch:
        for name in ("action_at", "action_id", "action"):
            batch.drop_column(name)
    with op.batch_alter_table("deployments") as batch:
        for name in ("action_at", "action_by", "action", "shadow", "mode"):
            batch.drop_column(name)
