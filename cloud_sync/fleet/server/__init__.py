"""The fleet service (``edge-fleet server``): MQTT ingestion into a database, and a REST API.

Public surface:

* :mod:`.config` - ``ServerSettings`` and ``load_settings`` (TOML ``[server]`` + environment + flags).
* :mod:`.db` - ``Database`` (SQLAlchemy engine, dialect quirks, Alembic migrations).
* :mod:`.schema` - the SQLAlchemy Core tables.
* :mod:`.ingest` - ``Ingestor`` (shared MQTT 5 subscription, batched exactly-once storage).
* :mod:`.api` - ``create_app`` (FastAPI) and :mod:`.auth` (tokens, roles, the ``require`` dependency).
* :mod:`.service` - ``run_server``: wiring and lifecycle; the only module that knows everything.

Everything here needs the ``fleet`` extra. Nothing in ``cloud_sync`` outside this package
imports it, and the device daemon never does.
"""
