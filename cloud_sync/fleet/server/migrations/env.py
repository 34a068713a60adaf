"""Alembic environment: always called from ``Database.migrate`` with an open connection."""

from __future__ import annotations

from alembic import context

from cloud_sync.fleet.server.schema import metadata

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
