"""Alembic environment: runs on a connection handed over by store.migrate, else on VPTQ_DB_URL."""

from alembic import context
from vptq_service.store.models import Base, UTCDateTime


def _render_item(type_, obj, autogen_context):
    """Render our UTC type as the plain column type, so revisions never import vptq_service.store.models."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        render_item=_render_item,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported: run against a database")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from vptq_service.store.db import make_engine

    engine = make_engine()
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


main()
