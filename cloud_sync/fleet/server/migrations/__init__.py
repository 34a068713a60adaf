"""Alembic migrations of the fleet database, run by the service at start (``Database.migrate``).

Add a revision as ``versions/NNNN_what.py`` with ``down_revision`` set to the previous one; use
``op.batch_alter_table`` for ALTERs so they work on SQLite too. ``tests/test_fleet_db.py`` checks
that the migrated database matches ``schema.py`` on SQLite and PostgreSQL.
"""
