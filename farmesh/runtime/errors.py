"""The one mapping from a failure to what an operator reads: one clear line, no traceback.

Every `farmesh` command runs under it (farmesh/cli.py): a database, broker or swarm that cannot be reached, a
model that cannot be loaded, a missing setting or a refused operation ends the command with `Error: <one line>`
and exit code 1. The traceback is still logged at DEBUG (FARMESH_LOG_LEVEL=DEBUG) for whoever needs it. Library
code raises ordinary exceptions (never SystemExit); only this mapping decides how they are shown.

What failed is read from where the exception was raised (the client library in its traceback, or in the
traceback of the exception it was raised from), not from which command ran: one rule for every command.
"""
from __future__ import annotations

import re
import socket
from collections.abc import Iterator


class SettingError(Exception):
    """A setting the command needs is missing or unusable (the message says which and how to give it)."""


class Refused(Exception):
    """An operation the domain refuses (unknown account, closed week, ...): the message is the whole story."""


def cannot_write(path: object, exc: OSError) -> Refused:
    """A directory that cannot be made or written (a model's destination), said in one line."""
    return Refused(f"{path}: cannot write there ({exc.strerror or type(exc).__name__})")


# Top-level module of a client library -> the service (or thing) it talks to.
_CLIENTS = {
    "asyncpg": "database",
    "aiokafka": "Kafka broker",
    "hivemind": "Petals swarm",
    "petals": "Petals swarm",
    "transformers": "model",
    "huggingface_hub": "model",
    "safetensors": "model",
}

# What to check, for each of them.
_HINTS = {
    "database": "check FARMESH_DATABASE_URL / --database-url",
    "Kafka broker": "check FARMESH_KAFKA_BOOTSTRAP / --kafka-bootstrap",
    "Petals swarm": "check FARMESH_INITIAL_PEERS / --initial-peers",
    "model": "check FARMESH_MODEL / --model",
}


def _leaf(exc: BaseException) -> BaseException:
    """The first real failure inside exception groups (asyncio.TaskGroup, anyio)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling (asyncio.wait_for's TimeoutError is raised
    from the CancelledError of the call it cut short: that one's traceback shows which client was waiting)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield _leaf(current)
        current = current.__cause__ or current.__context__


def _raised_in(exc: BaseException) -> str | None:
    """Which client library raised `exc`: the innermost one in its traceback (transformers called by petals
    is a model that did not load, not a swarm), else in the traceback of the exception it came from."""
    for link in _chain(exc):
        tb, found = link.__traceback__, None
        while tb is not None:
            root = tb.tb_frame.f_globals.get("__name__", "").split(".", 1)[0]
            found = _CLIENTS.get(root, found)
            tb = tb.tb_next
        if found is not None:
            return found
    return None


def _text(exc: BaseException) -> str:
    """The exception's message on one line, without the noise some clients put in it."""
    text = " ".join(str(exc).split())
    # aiokafka: [('127.0.0.1', 1, <AddressFamily.AF_INET: 2>)] -> [127.0.0.1:1]
    text = re.sub(r"\('([^']*)', (\d+), <AddressFamily\.\w+: \d+>\)", r"\1:\2", text)
    # p2pd (Go) puts its log time in the message
    text = re.sub(r"\b\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(\.\d+)? ", "", text)
    # transformers: a local directory that is not a model, then two sentences about the hub
    text = text.split(". If you were trying to load it from 'https://huggingface.co/models'", 1)[0]
    return text


def _described(exc: BaseException) -> str:
    """`Type: message` (aiokafka's errors name their type already), or what an empty message means."""
    name, text = type(exc).__name__, _text(exc)
    if text.startswith(f"{name}: "):
        return text
    if not text or text == name:
        text = "no answer in time" if isinstance(exc, TimeoutError) or "Timeout" in name else "(no message)"
    return f"{name}: {text}"


def one_line(exc: BaseException) -> str:
    """What to print for `exc`: one line that names what failed and, where it helps, what to check."""
    import asyncpg
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from db.migrate import MigrationError

    exc = _leaf(exc)
    if isinstance(exc, (SettingError, Refused, MigrationError)):
        return _text(exc) or type(exc).__name__
    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"database error: {_text(exc)} (run `farmesh db migrate`)"
    if isinstance(exc, (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError,
                        asyncpg.InvalidCatalogNameError)):
        return f"database refused the connection: {_text(exc)} ({_HINTS['database']})"
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
        return f"database error: {_described(exc)}"
    if isinstance(exc, KafkaConnectionError):
        return f"Kafka broker unreachable: {_described(exc)} ({_HINTS['Kafka broker']})"
    if isinstance(exc, KafkaError):
        return f"Kafka error: {_described(exc)}"
    where = _raised_in(exc)
    if where == "model" and isinstance(exc, (OSError, ValueError)):
        return f"model not loadable: {_described(exc)} ({_HINTS['model']})"
    if where is not None and (isinstance(exc, (OSError, TimeoutError)) or type(exc).__name__ == "P2PDaemonError"):
        return f"{where} unreachable: {_described(exc)} ({_HINTS[where]})"
    if where == "database" and isinstance(exc, ValueError):
        return f"database URL not usable: {_text(exc)} ({_HINTS['database']})"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {_text(exc)}"
    if where is not None:
        return f"{where} error: {_described(exc)}"
    return _described(exc)
