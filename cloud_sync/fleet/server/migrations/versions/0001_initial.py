"""Initial schema: devices, their groups and models, results, telemetry, events, gaps, commands, tokens.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Time: sa.Double[float] = sa.Double()


def _seq_table(name: str, *extra: sa.Column[object]) -> None:
    op.create_table(
        name,
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("ts", Time, nullable=False),
        sa.Column("received_at", Time, nullable=False),
        *extra,
        sa.Column("payload", Json, nullable=False),
        sa.PrimaryKeyConstraint("id", name=f"pk_{name}"),
        sa.UniqueConstraint("device_id", "seq", name=f"uq_{name}_device_id_seq"),
    )
    op.create_index(f"ix_{name}_received_at", name, ["received_at"])


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("online", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("first_seen", Time, nullable=False),
        sa.Column("last_seen", Time, nullable=False),
        sa.Column("state_at", Time),
        sa.Column("started_at", Time),
        sa.Column("agent_version", sa.String(64)),
        sa.Column("profile", sa.String(128)),
        sa.Column("health", Json),
        sa.Column("state", Json),
        sa.Column("telemetry", Json),
        sa.Column("telemetry_ts", Time),
        sa.Column("max_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("stored", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("duplicates", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("dropped", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rejected", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )
    op.create_index("ix_devices_online", "devices", ["online"])
    op.create_index("ix_devices_agent_version", "devices", ["agent_version"])

    op.create_table(
        "device_groups",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("group", sa.String(128), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE",
                                name="fk_device_groups_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", "group", name="pk_device_groups"),
    )
    op.create_index("ix_device_groups_group_device_id", "device_groups", ["group", "device_id"])

    op.create_table(
        "device_models",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("runtime", sa.String(32)),
        sa.Column("delegate", sa.String(64)),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE",
                                name="fk_device_models_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", "name", "version", name="pk_device_models"),
    )
    op.create_index("ix_device_models_name_version", "device_models", ["name", "version"])

    _seq_table("results", sa.Column("stream", sa.String(128), nullable=False), sa.Column("model", sa.String(200)))
    op.create_index("ix_results_device_id_stream_id", "results", ["device_id", "stream", "id"])
    _seq_table("telemetry")
    op.create_index("ix_telemetry_device_id_ts", "telemetry", ["device_id", "ts"])
    _seq_table("events", sa.Column("type", sa.String(64)))
    op.create_index("ix_events_device_id_id", "events", ["device_id", "id"])
    op.create_index("ix_events_type_id", "events", ["type", "id"])

    op.create_table(
        "gaps",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("detected_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gaps"),
    )
    op.create_index("ix_gaps_device_id_first_seq", "gaps", ["device_id", "first_seq"])
    op.create_index("ix_gaps_detected_at", "gaps", ["detected_at"])

    op.create_table(
        "commands",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("args", Json, nullable=False),
        sa.Column("sent_at", Time, nullable=False),
        sa.Column("sent_by", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ok", sa.Boolean),
        sa.Column("response", Json),
        sa.Column("responded_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_commands"),
    )
    op.create_index("ix_commands_device_id_sent_at", "commands", ["device_id", "sent_at"])
    op.create_index("ix_commands_sent_at", "commands", ["sent_at"])

    op.create_table(
        "command_responses",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("command_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ok", sa.Boolean),
        sa.Column("payload", Json, nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_command_responses"),
        sa.UniqueConstraint("command_id", "device_id", "status",
                            name="uq_command_responses_command_id_device_id_status"),
    )
    op.create_index("ix_command_responses_received_at", "command_responses", ["received_at"])

    op.create_table(
        "api_tokens",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("expires_at", Time),
        sa.Column("revoked_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )


def downgrade() -> None:
    for table in ("api_tokens", "command_responses", "commands", "gaps", "events", "telemetry", "results",
                  "device_models", "device_groups", "devices"):
        op.drop_table(table)
