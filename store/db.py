"""Engine and session factory for the lineage database.

URL from `VPTQ_DB_URL`; default an SQLite file `vptq.db` in `VPTQ_HOME` (default: the user's data
dir via platformdirs), which also holds the local artifact store and job workspaces. The same code
runs on PostgreSQL (`postgresql+psycopg://user@host:5432/db`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from vptq_service.store.errors import StoreError, is_secret_name, mask_text, mask_url

log = logging.getLogger(__name__)

_URL_HELP = "expected e.g. postgresql+psycopg://user@host:5432/db or sqlite:////abs/path/vptq.db"


def vptq_home() -> Path:
    """VPTQ_HOME, or the per-user data dir; created if missing."""
    raw = os.environ.get("VPTQ_HOME")
    if raw is not None and not raw.strip():
        raise StoreError("VPTQ_HOME is set but empty: unset it or give a folder path")
    if raw:
        home = Path(raw).expanduser()
    else:
        from platformdirs import user_data_dir

        home = Path(user_data_dir("vptq", appauthor=False))
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create VPTQ_HOME folder {home}: {e.strerror}; set VPTQ_HOME to a writable folder") from None
    return home


def db_url() -> str:
    """The configured database URL (not masked: pass it only to make_engine)."""
    raw = os.environ.get("VPTQ_DB_URL", "").strip()
    if raw:
        return raw
    return f"sqlite:///{vptq_home() / 'vptq.db'}"


def shown_url(url: URL | str) -> str:
    """A database URL as it may be printed, logged or stored: the one masking rule (store.errors)."""
    return mask_text(url.render_as_string(hide_password=True) if isinstance(url, URL) else url)


def parse_url(raw: str) -> URL:
    """Validate a database URL; StoreError with a masked copy and an example when it is malformed.

    A `?password=` query parameter becomes the URL's password, so that every rendering of the URL
    (SQLAlchemy's own included: `engine.url`, reprs, logs) hides it; other secret parameters
    (`sslpassword`) are taken out by `secret_params`."""
    try:
        url = make_url(raw)
    except ArgumentError:
        raise StoreError(f"VPTQ_DB_URL {mask_url(raw)!r} is not a database URL: {_URL_HELP}") from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(f"VPTQ_DB_URL {shown_url(url)!r}: unsupported database {backend!r}; {_URL_HELP}")
    if url.drivername == "postgresql":
        # Only psycopg (3) is a dependency; plain postgresql:// would pick psycopg2.
        url = url.set(drivername="postgresql+psycopg")
    if "password" in url.query:
        given = url.query["password"]
        url = url.difference_update_query(["password"]).set(password=given if isinstance(given, str) else given[-1])
    if backend == "postgresql" and not url.database:
        raise StoreError(f"VPTQ_DB_URL {shown_url(url)!r} names no database; {_URL_HELP}")
    return url


def secret_params(url: URL) -> tuple[URL, dict[str, str]]:
    """(url without secret-looking query parameters, those parameters): they go to the driver as
    connect arguments, never into `engine.url`, which is printed and logged."""
    hidden = {k: (v if isinstance(v, str) else v[-1]) for k, v in url.query.items() if is_secret_name(k)}
    return (url.difference_update_query(list(hidden)) if hidden else url), hidden


def make_engine(raw_url: str | None = None) -> Engine:
    """An Engine for raw_url (default: db_url()), checked to answer; errors are StoreError, masked."""
    raw = raw_url or db_url()
    url, hidden = secret_params(parse_url(raw))
    shown = shown_url(url)
    try:
        if url.get_backend_name() == "sqlite":
            engine = _sqlite_engine(url)
        else:
            engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5, **hidden})
    except (NoSuchModuleError, ImportError):
        raise StoreError(f"VPTQ_DB_URL {shown!r}: no driver {url.drivername!r}; {_URL_HELP}") from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as e:
        engine.dispose()
        cause = str(getattr(e, "orig", e)).splitlines()[0] if str(getattr(e, "orig", e)) else type(e).__name__
        raise StoreError(f"cannot reach database {shown}: {cause}; check VPTQ_DB_URL and that the server is running",
                         url.password, *hidden.values()) from None
    log.debug("database %s", shown)
    return engine


def _sqlite_engine(url: URL) -> Engine:
    """SQLite tuned for several processes: WAL, a busy timeout, and BEGIN IMMEDIATE transactions."""
    if url.database and url.database != ":memory:":
        try:
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder of {url.database}: {e.strerror}; fix VPTQ_DB_URL or VPTQ_HOME") from None
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # pysqlite's own BEGIN handling is switched off so that "begin" below controls it.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if url.database and url.database != ":memory:":
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
        # writes can fail with SQLITE_BUSY at once instead of waiting for another process.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (entities are built after the commit)."""
    return sessionmaker(engine, expire_on_commit=False)


def is_operational(e: Exception) -> bool:
    """True for connection-level database failures (retryable by the caller)."""
    return isinstance(e, OperationalError)
