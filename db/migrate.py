"""Schema migrations on asyncpg (no ORM).

Migrations are packaged SQL files in ``db/migrations``: ``NNN_name.sql`` (up) and
``NNN_name.down.sql`` (down). Applied versions are recorded in ``far_schema_migrations`` with the
SHA-256 of their up script; an applied script that changed afterwards is refused.

Every migration runs in its own transaction, and the whole run holds a PostgreSQL advisory lock,
so concurrent migrators (several services starting at once) are safe: the second one waits and
then finds nothing to do.

CLI: ``farmesh db migrate | rollback [--to VERSION | --steps N] [--yes] | status``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg
import click

VERSION_TABLE = "far_schema_migrations"
# pg advisory lock key (bigint) shared by every farmesh migrator of a database.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"farmesh.schema_migrations").digest()[:8], "big", signed=True)

_UP_RE = re.compile(r"^(?P<version>\d{3,})_(?P<name>[A-Za-z0-9_]+)\.sql$")
_DOWN_SUFFIX = ".down.sql"

_CREATE_VERSION_TABLE = f"""
CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
    version    INT PRIMARY KEY,
    name       TEXT NOT NULL,
    checksum   TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """A migration cannot be applied or reverted safely."""


class ChecksumMismatchError(MigrationError):
    """An applied migration's up script differs from the one that was applied."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up_sql: str
    down_sql: str | None
    checksum: str

    @property
    def label(self) -> str:
        return f"{self.version:03d}_{self.name}"


@dataclass(frozen=True)
class MigrationStatus:
    version: int
    name: str
    # applied | pending | changed (applied, file differs) | missing (applied, no file here)
    state: str
    applied_at: datetime | None

    @property
    def label(self) -> str:
        return f"{self.version:03d}_{self.name}"


def checksum(sql: str) -> str:
    return hashlib.sha256(sql.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def default_migrations_dir() -> Traversable:
    return files("db").joinpath("migrations")


def discover(migrations_dir: Path | Traversable | None = None) -> list[Migration]:
    """The migrations in `migrations_dir` (default: the packaged ones), in version order."""
    root = default_migrations_dir() if migrations_dir is None else migrations_dir
    entries = {entry.name: entry for entry in root.iterdir() if entry.is_file()}
    found: dict[int, Migration] = {}
    for filename, entry in sorted(entries.items()):
        if filename.endswith(_DOWN_SUFFIX):
            up_name = filename[: -len(_DOWN_SUFFIX)] + ".sql"
            if up_name not in entries:
                raise MigrationError(f"{filename} has no matching up migration {up_name}")
            continue
        match = _UP_RE.match(filename)
        if match is None:
            if filename.endswith(".sql"):
                raise MigrationError(f"migration file {filename!r} is not named NNN_name.sql")
            continue
        version = int(match["version"])
        if version in found:
            raise MigrationError(f"two migrations share version {version}: "
                                 f"{found[version].label}.sql and {filename}")
        up_sql = entry.read_text(encoding="utf-8")
        down_entry = entries.get(filename[: -len(".sql")] + _DOWN_SUFFIX)
        down_sql = down_entry.read_text(encoding="utf-8") if down_entry is not None else None
        found[version] = Migration(version, match["name"], up_sql, down_sql, checksum(up_sql))
    return [found[v] for v in sorted(found)]


def _asyncpg_dsn(dsn: str) -> str:
    # Accept SQLAlchemy-style URLs (postgresql+asyncpg://...) too.
    return re.sub(r"^(postgres(?:ql)?)\+[a-z0-9_]+://", r"\1://", dsn)


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(_asyncpg_dsn(dsn), timeout=15)


async def _lock(conn: asyncpg.Connection, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        if time.monotonic() >= deadline:
            raise MigrationError(f"another migrator held the migrations lock for over {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _unlock(conn: asyncpg.Connection) -> None:
    if not conn.is_closed():
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def _applied(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    if await conn.fetchval("SELECT to_regclass($1)", VERSION_TABLE) is None:
        return {}
    rows = await conn.fetch(f"SELECT version, name, checksum, applied_at FROM {VERSION_TABLE} ORDER BY version")
    return {row["version"]: row for row in rows}


def _check_unchanged(migrations: Iterable[Migration], applied: dict[int, asyncpg.Record]) -> None:
    changed = [m for m in migrations if m.version in applied and applied[m.version]["checksum"] != m.checksum]
    if changed:
        names = ", ".join(f"{m.label}.sql" for m in changed)
        raise ChecksumMismatchError(
            f"applied migration(s) changed since they were applied: {names}. Applied migrations are "
            f"immutable: restore the original file(s) and put schema changes in a new migration."
        )


@contextlib.asynccontextmanager
async def _locked(dsn: str, lock_timeout: float) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the migration lock (one migrate/rollback at a time, on any host)."""
    conn = await _connect(dsn)
    try:
        await _lock(conn, lock_timeout)
        try:
            yield conn
        finally:
            await _unlock(conn)
    finally:
        await conn.close()


async def _step(conn: asyncpg.Connection, sql: str, bookkeeping: str, args: Sequence[object], failed: str) -> None:
    """Run one migration's SQL and its version-table change in one transaction; all or nothing."""
    try:
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute(bookkeeping, *args)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"{failed}: {type(exc).__name__}: {exc}") from exc


async def migrate(
    dsn: str, *, migrations_dir: Path | Traversable | None = None, lock_timeout: float = 120.0
) -> list[Migration]:
    """Apply every pending migration in version order, each in its own transaction.

    Returns the migrations applied (empty when the database is up to date).
    """
    migrations = discover(migrations_dir)
    async with _locked(dsn, lock_timeout) as conn:
        await conn.execute(_CREATE_VERSION_TABLE)
        applied = await _applied(conn)
        _check_unchanged(migrations, applied)
        done: list[Migration] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            await _step(conn, migration.up_sql,
                        f"INSERT INTO {VERSION_TABLE} (version, name, checksum) VALUES ($1, $2, $3)",
                        (migration.version, migration.name, migration.checksum),
                        f"migration {migration.label} failed and was rolled back")
            done.append(migration)
        return done


def _select_for_rollback(applied_versions: Iterable[int], to_version: int | None, steps: int | None) -> list[int]:
    """Applied versions to revert, newest first."""
    if to_version is not None and steps is not None:
        raise ValueError("give either to_version or steps, not both")
    newest_first = sorted(applied_versions, reverse=True)
    if steps is not None:
        if steps < 0:
            raise ValueError("steps must be >= 0")
        return newest_first[:steps]
    floor = 0 if to_version is None else to_version
    return [v for v in newest_first if v > floor]


async def rollback(
    dsn: str,
    to_version: int | None = None,
    *,
    steps: int | None = None,
    migrations_dir: Path | Traversable | None = None,
    lock_timeout: float = 120.0,
) -> list[Migration]:
    """Revert applied migrations, newest first, each in its own transaction.

    `to_version=N` reverts every applied migration above N; `steps=K` reverts the K newest;
    neither reverts all of them. Returns the migrations reverted.
    """
    by_version = {m.version: m for m in discover(migrations_dir)}
    async with _locked(dsn, lock_timeout) as conn:
        applied = await _applied(conn)
        targets = _select_for_rollback(applied, to_version, steps)
        unknown = [v for v in targets if v not in by_version or by_version[v].down_sql is None]
        if unknown:
            raise MigrationError(
                "no down migration available for applied version(s) "
                + ", ".join(f"{v:03d}_{applied[v]['name']}" for v in unknown)
            )
        _check_unchanged((by_version[v] for v in targets), applied)
        done: list[Migration] = []
        for version in targets:
            migration = by_version[version]
            await _step(conn, migration.down_sql, f"DELETE FROM {VERSION_TABLE} WHERE version = $1", (version,),
                        f"rollback of {migration.label} failed and was undone")
            done.append(migration)
        return done


async def status(dsn: str, *, migrations_dir: Path | Traversable | None = None) -> list[MigrationStatus]:
    """Every known or applied migration with its state, in version order."""
    migrations = {m.version: m for m in discover(migrations_dir)}
    conn = await _connect(dsn)
    try:
        applied = await _applied(conn)
    finally:
        await conn.close()
    result = []
    for version in sorted(set(migrations) | set(applied)):
        row = applied.get(version)
        migration = migrations.get(version)
        if migration is None:
            state = "missing"
        elif row is None:
            state = "pending"
        elif row["checksum"] != migration.checksum:
            state = "changed"
        else:
            state = "applied"
        name = migration.name if migration is not None else row["name"]
        result.append(MigrationStatus(version, name, state, row["applied_at"] if row else None))
    return result


# --------------------------------------------------------------------------- CLI


def _dsn(database_url: str | None) -> str:
    if not database_url:
        # A missing setting, like every other command's (one line, exit 1), not a usage error.
        raise click.ClickException("no database: pass --database-url or set FARMESH_DATABASE_URL")
    return database_url


# Failures (database unreachable, a changed migration) are shown by the `farmesh` root command's error mapping.
_database_url_option = click.option(
    "--database-url", envvar="FARMESH_DATABASE_URL", default=None, metavar="URL",
    help="PostgreSQL URL [FARMESH_DATABASE_URL].",
)


@click.group("db")
def db_group() -> None:
    """Database schema: migrate, rollback, status."""


@db_group.command("migrate")
@_database_url_option
def migrate_command(database_url: str | None) -> None:
    """Apply pending migrations."""
    applied = asyncio.run(migrate(_dsn(database_url)))
    for migration in applied:
        click.echo(f"applied {migration.label}")
    if not applied:
        click.echo("database is up to date")


@db_group.command("rollback")
@_database_url_option
@click.option("--to", "to_version", type=click.IntRange(min=0), default=None, metavar="VERSION",
              help="Revert every migration above VERSION (default: all).")
@click.option("--steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Revert the N newest migrations.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def rollback_command(database_url: str | None, to_version: int | None, steps: int | None, yes: bool) -> None:
    """Revert applied migrations (drops their tables and data)."""
    if to_version is not None and steps is not None:
        raise click.UsageError("--to and --steps are mutually exclusive")
    dsn = _dsn(database_url)
    if not yes and sys.stdin.isatty():
        states = asyncio.run(status(dsn))
        labels = {s.version: s.label for s in states}
        targets = _select_for_rollback(
            [s.version for s in states if s.applied_at is not None], to_version, steps)
        if not targets:
            click.echo("nothing to revert")
            return
        click.confirm(f"Revert {', '.join(labels[v] for v in targets)}? This drops their tables and data",
                      abort=True)
    reverted = asyncio.run(rollback(dsn, to_version, steps=steps))
    for migration in reverted:
        click.echo(f"reverted {migration.label}")
    if not reverted:
        click.echo("nothing to revert")


@db_group.command("status")
@_database_url_option
def status_command(database_url: str | None) -> None:
    """Show each migration and whether it is applied."""
    states = asyncio.run(status(_dsn(database_url)))
    for s in states:
        when = s.applied_at.isoformat(timespec="seconds") if s.applied_at else "-"
        click.echo(f"{s.label}  {s.state}  {when}")


__all__ = [
    "ChecksumMismatchError",
    "LOCK_KEY",
    "Migration",
    "MigrationError",
    "MigrationStatus",
    "VERSION_TABLE",
    "db_group",
    "default_migrations_dir",
    "discover",
    "migrate",
    "rollback",
    "status",
]
