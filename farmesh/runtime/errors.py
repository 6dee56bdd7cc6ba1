"""The one mapping from a failure to what an operator reads: one clear line, no traceback.

Every `farmesh` command runs under it (farmesh/cli.py): a database, broker or swarm that cannot be reached, a
missing setting or a refused operation ends the command with `Error: <one line>` and exit code 1. The traceback
is still logged at DEBUG (FARMESH_LOG_LEVEL=DEBUG) for whoever needs it. Library code raises ordinary
exceptions (never SystemExit); only this mapping decides how they are shown.
"""
from __future__ import annotations

import socket


class SettingError(Exception):
    """A setting the command needs is missing or unusable (the message says which and how to give it)."""


class Refused(Exception):
    """An operation the domain refuses (unknown account, closed week, ...): the message is the whole story."""


def _leaf(exc: BaseException) -> BaseException:
    """The first real failure inside exception groups (asyncio.TaskGroup, anyio)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _raised_in(exc: BaseException) -> str | None:
    """Which service client raised `exc`, from the modules of its traceback: database, broker or swarm."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        root = module.split(".", 1)[0]
        if root == "asyncpg":
            found = "database"
        elif root == "aiokafka":
            found = "Kafka broker"
        elif root in ("hivemind", "petals"):
            found = "Petals swarm"
        tb = tb.tb_next
    return found


def one_line(exc: BaseException) -> str:
    """What to print for `exc`: one line that names what failed and, where it helps, what to do."""
    import asyncpg
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from db.migrate import MigrationError

    exc = _leaf(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (SettingError, Refused, MigrationError)):
        return text
    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"database error: {text} (run `farmesh db migrate`)"
    if isinstance(exc, (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError,
                        asyncpg.InvalidCatalogNameError)):
        return f"database refused the connection: {text}"
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
        return f"database error: {type(exc).__name__}: {text}"
    if isinstance(exc, KafkaConnectionError):
        return f"Kafka broker unreachable: {text} (check FARMESH_KAFKA_BOOTSTRAP / --kafka-bootstrap)"
    if isinstance(exc, KafkaError):
        return f"Kafka error: {type(exc).__name__}: {text}"
    where = _raised_in(exc)
    if isinstance(exc, (OSError, TimeoutError)) and where is not None:
        return f"{where} unreachable: {type(exc).__name__}: {text}"
    if isinstance(exc, ValueError) and where == "database":
        return f"database URL not usable: {text}"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {text}"
    return f"{type(exc).__name__}: {text}"
