"""Alembic revisions (applied in ``down_revision`` order)."""
