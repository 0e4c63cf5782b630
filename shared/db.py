"""The SQLAlchemy base, engines and sessions (SQLAlchemy 2.0 style)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

# Constraint names Alembic can rely on, the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for ``url`` keeping up to ``pool_size`` connections open (SQLAlchemy's
    default: 5); SQLite gets WAL, a busy timeout and foreign keys, so a web server and a
    worker can share the file."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, pool_size=pool_size)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # Last in, first out: the connection given back last is handed out next, so a light load
    # keeps reusing the same few and the rest sit idle. First in, first out (the default)
    # would rotate every pooled connection: once a burst (thousands of event streams
    # connecting) filled the pool, reads at a few to a few dozen a second (fewer than
    # pool_size / IDLE_PING_SECONDS) would find each connection idle past IDLE_PING_SECONDS
    # and ping it, a transaction more per read.
    engine = create_engine(url, pool_size=pool_size, pool_use_lifo=True)
    _ping_when_idle(engine)
    return engine


#: A pooled connection unused for longer than this is pinged before it is handed out.
IDLE_PING_SECONDS = 0.5


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before use only when it sat idle: like ``pool_pre_ping``,
    but without its round trip on a busy server, whose connections come back within
    milliseconds (HikariCP's ``aliveBypassWindowMs``, 500 ms, does the same). A fresh
    connection is not pinged. A connection that dies while in steady use fails its request
    once (the API answers 503 with Retry-After), and SQLAlchemy then renews the pool."""
    last_used = "stylequeue_last_used"  # our key in the record's shared ``info``

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _note_use(_dbapi_connection: DBAPIConnection | None, record: ConnectionPoolEntry) -> None:
        record.info[last_used] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(
        dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry, _proxy: object
    ) -> None:
        if time.monotonic() - record.info.get(last_used, 0.0) <= IDLE_PING_SECONDS:
            return
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            if not dialect.is_disconnect(error, dbapi_connection, None):
                raise  # a database error, not a dead connection: the caller's to handle
            # As pool_pre_ping does: every connection pooled before now is suspect; the
            # pool connects afresh (a fresh connection is not pinged again).
            raise InvalidatePoolError(f"stale pooled connection: {error}") from error


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def insert_ignoring_duplicates(session: Session, model: type[Any]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` into ``model``'s table in the session's
    dialect (PostgreSQL or SQLite): a row written twice (a retried write, two requests with
    the same new image) is written once."""
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}[dialect]
    return insert(model).on_conflict_do_nothing()
