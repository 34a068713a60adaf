"""The fleet database schema (SQLAlchemy Core), identical on SQLite and PostgreSQL.

Times are Unix epoch seconds (double precision) as the devices send them; ``received_at`` is the
service's clock. Device-originated rows are unique on ``(device_id, seq)``: the outbox numbers every
message of a device once, so at-least-once deliveries are stored exactly once. Changes to the schema
are Alembic migrations in ``migrations/versions`` (never edit a shipped migration; add one). Rollouts
and deployments (issue 14, item 5) come as a later migration with their own tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

#: ``BIGINT`` on PostgreSQL, ``INTEGER`` on SQLite (so an ``id`` primary key is the rowid alias).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
#: ``JSONB`` on PostgreSQL, ``JSON`` (text + json functions) on SQLite.
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Time: sa.Double[float] = sa.Double()

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
})

DEVICE_ID = 128
NAME = 128

devices = sa.Table(
    "devices", metadata,
    sa.Column("id", sa.String(DEVICE_ID), primary_key=True),
    sa.Column("online", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("first_seen", Time, nullable=False),
    sa.Column("last_seen", Time, nullable=False),
    sa.Column("state_at", Time),  # when the last state (birth / Last Will) arrived
    sa.Column("started_at", Time),
    sa.Column("agent_version", sa.String(64)),
    sa.Column("profile", sa.String(NAME)),
    sa.Column("health", Json),
    sa.Column("state", Json),  # the last retained state message as sent
    sa.Column("telemetry", Json),  # the latest telemetry sample
    sa.Column("telemetry_ts", Time),
    sa.Column("max_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("stored", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("duplicates", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("dropped", sa.BigInteger, nullable=False, server_default="0"),  # flood limit
    sa.Column("rejected", sa.BigInteger, nullable=False, server_default="0"),  # bad payloads
    sa.Index(None, "online"),
    sa.Index(None, "agent_version"),
)

device_groups = sa.Table(
    "device_groups", metadata,
    sa.Column("device_id", sa.String(DEVICE_ID), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("group", sa.String(NAME), primary_key=True),
    sa.Index(None, "group", "device_id"),
)

device_models = sa.Table(
    "device_models", metadata,
    sa.Column("device_id", sa.String(DEVICE_ID), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(NAME), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("runtime", sa.String(32)),
    sa.Column("delegate", sa.String(64)),
    sa.Index(None, "name", "version"),
)


def _device_rows(name: str, *extra: sa.Column[object] | sa.Index) -> sa.Table:
    """A table of device-originated, seq-numbered messages (results, telemetry, events)."""
    return sa.Table(
        name, metadata,
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(DEVICE_ID), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("ts", Time, nullable=False),
        sa.Column("received_at", Time, nullable=False),
        *extra,
        sa.Column("payload", Json, nullable=False),
        sa.UniqueConstraint("device_id", "seq"),
        sa.Index(None, "received_at"),
    )


results = _device_rows(
    "results",
    sa.Column("stream", sa.String(NAME), nullable=False),
    sa.Column("model", sa.String(200)),
    sa.Index(None, "device_id", "stream", "id"),
)
telemetry = _device_rows("telemetry", sa.Index(None, "device_id", "ts"))
events = _device_rows(
    "events",
    sa.Column("type", sa.String(64)),
    sa.Index(None, "device_id", "id"),
    sa.Index(None, "type", "id"),
)

gaps = sa.Table(
    "gaps", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(DEVICE_ID), nullable=False),
    sa.Column("first_seq", sa.BigInteger, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("detected_at", Time, nullable=False),
    sa.Index(None, "device_id", "first_seq"),
    sa.Index(None, "detected_at"),
)

commands = sa.Table(
    "commands", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the command id devices use to deduplicate
    sa.Column("device_id", sa.String(DEVICE_ID), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("args", Json, nullable=False),
    sa.Column("sent_at", Time, nullable=False),
    sa.Column("sent_by", sa.String(NAME)),
    sa.Column("status", sa.String(16), nullable=False),  # sent | accepted | done
    sa.Column("ok", sa.Boolean),
    sa.Column("response", Json),
    sa.Column("responded_at", Time),
    sa.Index(None, "device_id", "sent_at"),
    sa.Index(None, "sent_at"),
)

command_responses = sa.Table(
    "command_responses", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("command_id", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(DEVICE_ID), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("ok", sa.Boolean),
    sa.Column("payload", Json, nullable=False),
    sa.Column("received_at", Time, nullable=False),
    sa.UniqueConstraint("command_id", "device_id", "status"),
    sa.Index(None, "received_at"),
)

api_tokens = sa.Table(
    "api_tokens", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(NAME), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the token
    sa.Column("created_at", Time, nullable=False),
    sa.Column("expires_at", Time),
    sa.Column("revoked_at", Time),
)

#: Device-originated tables: kind (as the outbox names it) -> table.
SEQ_TABLES = {"result": results, "telemetry": telemetry, "event": events}

# -- rollouts (migration 0002) ----------------------------------------------------------------------------
deployments = sa.Table(
    "deployments", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(NAME), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("target", Json, nullable=False),  # {"devices": [...]} or {"group": "...", "online_only": bool}
    sa.Column("canary", sa.String(16), nullable=False),  # "N" or "P%"
    sa.Column("wave_size", sa.String(16)),  # "N", "P%" or NULL (all the rest)
    sa.Column("abort_threshold", sa.String(16), nullable=False),  # failures in a wave: "N" or "P%"
    sa.Column("wave_timeout_s", Time, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # running | succeeded | failed | aborted
    sa.Column("waves", sa.Integer, nullable=False),
    sa.Column("current_wave", sa.Integer, nullable=False, server_default="0"),
    sa.Column("wave_started_at", Time),
    sa.Column("accepted_failures", sa.Integer, nullable=False, server_default="0"),  # forgiven by a resume
    sa.Column("created_at", Time, nullable=False),
    sa.Column("created_by", sa.String(NAME)),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("finished_at", Time),
    sa.Column("reason", sa.Text),
    sa.Column("lease_owner", sa.String(NAME)),  # the instance driving it (MQTT client id)
    sa.Column("lease_until", Time),
    # shadow rollouts (migration 0004): "swap" | "shadow", the deploy command's shadow arguments, and the
    # operator's later "promote" | "discard" of the devices that reached shadowing
    sa.Column("mode", sa.String(16), nullable=False, server_default="swap"),
    sa.Column("shadow", Json),
    sa.Column("action", sa.String(16)),
    sa.Column("action_by", sa.String(NAME)),
    sa.Column("action_at", Time),
    sa.Index(None, "status"),
    sa.Index(None, "created_at"),
)

deployment_devices = sa.Table(
    "deployment_devices", metadata,
    sa.Column("deployment_id", sa.String(64), sa.ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("device_id", sa.String(DEVICE_ID), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("command_id", sa.String(64), nullable=False, unique=True),  # stable: hash of deployment + device
    # pending | sending | sent | accepted | succeeded | failed | timeout | skipped
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("sent_at", Time),
    sa.Column("finished_at", Time),
    sa.Column("error", Json),
    sa.Column("action", sa.String(16)),  # promote | discard (migration 0004): sent to this device
    sa.Column("action_id", sa.String(64)),  # that command's id (its outcome is the command's)
    sa.Column("action_at", Time),
    sa.Index(None, "deployment_id", "wave"),
)

# -- web console (migration 0003) -------------------------------------------------------------------------
console_sessions = sa.Table(
    "console_sessions", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # sha256 hex of the cookie's secret (never stored)
    sa.Column("token_id", BigId, sa.ForeignKey("api_tokens.id", ondelete="CASCADE"), nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),  # the session's CSRF token, sent back in every form
    sa.Column("created_at", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False),
    sa.Index(None, "expires_at"),
    sa.Index(None, "token_id"),
)
