"""Schema migrations: apply Alembic revisions, read the current one, open a database at head.

An SQLite database is created and upgraded on first use; PostgreSQL is upgraded only on request
(`vptq db upgrade`), since a shared server's schema is an operator's decision.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from vptq_service.store.db import make_engine, shown_url
from vptq_service.store.errors import StoreError

log = logging.getLogger(__name__)

INI = Path(__file__).with_name("alembic.ini")


def alembic_config() -> Config:
    """The packaged Alembic config (script location resolved relative to the package)."""
    return Config(str(INI))


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# pg_advisory_xact_lock key of the schema migration (any fixed 64-bit number: "vptq" + "migr")
MIGRATION_LOCK = 0x7670_7471_6D69_6772


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Apply migrations up to revision in one transaction; returns the revision now current."""
    return upgrade_from(engine, revision)[1]


def upgrade_from(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """(revision before, revision after) of an upgrade to revision in one transaction; "before" is read
    under the lock, so the second of two concurrent upgrades reports the first one's result as its start.

    Two upgrades at once (two `vptq db upgrade`, or two workers starting) are serialized: on
    PostgreSQL by an advisory lock held until the transaction ends, on SQLite by BEGIN IMMEDIATE
    (store/db.py). The second one then reads the first one's revision and has nothing to do,
    where it used to fail with an IntegrityError on alembic_version or a duplicate table."""
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    now = current_revision(engine)
    log.info("database schema at revision %s", now)
    return before, now


def open_database(url: str | None = None) -> Engine:
    """An engine whose schema is at head: SQLite is upgraded in place, others must be upgraded first."""
    engine = make_engine(url)
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return engine
    if engine.dialect.name == "sqlite":
        upgrade(engine)
        return engine
    engine.dispose()
    state = "has no vptq schema" if current is None else f"is at revision {current}, code expects {head}"
    raise StoreError(f"database {shown_url(engine.url)} {state}; run `vptq db upgrade`")
