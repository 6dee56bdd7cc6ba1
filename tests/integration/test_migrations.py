"""db/migrate.py against a real PostgreSQL: apply, re-apply, roll back, tamper detection, CLI."""
from __future__ import annotations

import asyncio
import shutil
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner

from db.migrate import (
    VERSION_TABLE,
    ChecksumMismatchError,
    MigrationError,
    db_group,
    default_migrations_dir,
    discover,
    migrate,
    rollback,
    status,
)

pytestmark = pytest.mark.integration

OUR_TABLES = {"far_mesh_sessions", "far_nodes", "far_payment_batches", "far_session_contributions"}
# Every packaged migration, in order (004 and whatever later issues added).
ALL = [m.version for m in discover()]
LABELS = [m.label for m in discover()]


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    finally:
        await conn.close()
    return {r["table_name"] for r in rows}


async def _versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [r["version"] for r in await conn.fetch(f"SELECT version FROM {VERSION_TABLE} ORDER BY version")]
    finally:
        await conn.close()


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of the packaged migrations that a test may edit."""
    target = tmp_path / "migrations"
    target.mkdir()
    for entry in default_migrations_dir().iterdir():
        if entry.name.endswith(".sql"):
            (target / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    return target


def test_discover_finds_004_with_down() -> None:
    migrations = discover()
    assert migrations[0].version == 4 and ALL == sorted(set(ALL))
    assert migrations[0].name == "distributed_inference"
    assert migrations[0].down_sql and "DROP TABLE" in migrations[0].down_sql
    assert all(m.down_sql for m in migrations), "every migration can be rolled back"


async def test_migrate_rollback_cycle(empty_database_url: str) -> None:
    url = empty_database_url
    applied = await migrate(url)
    assert [m.label for m in applied] == LABELS
    assert OUR_TABLES | {VERSION_TABLE} <= await _tables(url)
    assert await _versions(url) == ALL
    assert [(s.version, s.state) for s in await status(url)] == [(v, "applied") for v in ALL]

    assert await migrate(url) == []  # re-running is a no-op
    assert await _versions(url) == ALL

    reverted = await rollback(url)
    assert [m.version for m in reverted] == ALL[::-1]
    assert not OUR_TABLES & await _tables(url)
    assert await _tables(url) <= {VERSION_TABLE}
    assert await _versions(url) == []
    assert [(s.version, s.state) for s in await status(url)] == [(v, "pending") for v in ALL]
    assert await rollback(url) == []  # nothing left to revert

    assert [m.version for m in await migrate(url)] == ALL  # and forward again
    assert OUR_TABLES <= await _tables(url)


async def test_rollback_to_and_steps(empty_database_url: str) -> None:
    url = empty_database_url
    await migrate(url)
    assert await rollback(url, to_version=ALL[-1]) == []  # nothing above the newest
    assert await rollback(url, steps=0) == []
    assert [m.version for m in await rollback(url, steps=1)] == [ALL[-1]]
    await migrate(url)
    assert [m.version for m in await rollback(url, to_version=3)] == ALL[::-1]
    with pytest.raises(ValueError):
        await rollback(url, to_version=0, steps=1)


async def test_concurrent_migrators_apply_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database_url) for _ in range(3)))
    assert sorted(len(r) for r in results) == [0, 0, len(ALL)]
    assert await _versions(empty_database_url) == ALL


async def test_changed_migration_is_refused(empty_database_url: str, migrations_copy: Path) -> None:
    url = empty_database_url
    up = migrations_copy / "004_distributed_inference.sql"
    original = up.read_text()
    await migrate(url, migrations_dir=migrations_copy)

    up.write_text(original + "\nALTER TABLE far_nodes ADD COLUMN sneaky INT;\n")
    with pytest.raises(ChecksumMismatchError, match="004_distributed_inference"):
        await migrate(url, migrations_dir=migrations_copy)
    assert [s.state for s in await status(url, migrations_dir=migrations_copy)] == ["changed"] + ["applied"] * (len(ALL) - 1)
    with pytest.raises(ChecksumMismatchError):
        await rollback(url, migrations_dir=migrations_copy)

    up.write_text(original)
    assert await migrate(url, migrations_dir=migrations_copy) == []
    assert [m.version for m in await rollback(url, migrations_dir=migrations_copy)] == ALL[::-1]


async def test_new_migration_applies_after_004_and_failed_one_rolls_back(
    empty_database_url: str, migrations_copy: Path
) -> None:
    url = empty_database_url
    (migrations_copy / "900_extra.sql").write_text("CREATE TABLE far_extra (id INT PRIMARY KEY);")
    (migrations_copy / "900_extra.down.sql").write_text("DROP TABLE far_extra;")
    (migrations_copy / "901_broken.sql").write_text(
        "CREATE TABLE far_half (id INT); SELECT * FROM no_such_table;")
    with pytest.raises(MigrationError, match="901_broken"):
        await migrate(url, migrations_dir=migrations_copy)
    tables = await _tables(url)
    assert "far_extra" in tables and "far_half" not in tables  # 901 rolled back as a whole
    assert await _versions(url) == [*ALL, 900]

    (migrations_copy / "901_broken.sql").unlink()
    with pytest.raises(MigrationError, match="no down migration"):
        # an applied version with no file here cannot be reverted
        await rollback(url, migrations_dir=Path(shutil.copytree(
            migrations_copy, migrations_copy.parent / "packaged-only",
            ignore=shutil.ignore_patterns("900_*"))))
    reverted = await rollback(url, migrations_dir=migrations_copy)
    assert [m.version for m in reverted] == [900, *ALL[::-1]]
    assert "far_extra" not in await _tables(url)


async def test_schema_constraints(db_pool: asyncpg.Pool) -> None:
    """The session database is migrated; money round-trips exactly and constraints hold."""
    async with db_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await _exercise_constraints(conn)
        finally:
            await tx.rollback()  # leave the shared database clean


async def _exercise_constraints(conn: asyncpg.Connection) -> None:
    price = Decimal("0.000100000000000001")
    await conn.execute(
        """INSERT INTO far_mesh_sessions (request_id, event_id, model, status, prompt_tokens,
               completion_tokens, completion, price_per_token, cost, started_at, finished_at, worker)
           VALUES ('r1', gen_random_uuid(), 'm', 'completed', 3, 5, 'hi', $1, $2, now(), now(), 'w')""",
        price, price * 8)
    assert await conn.fetchval("SELECT cost FROM far_mesh_sessions WHERE request_id = 'r1'") == price * 8
    contribution = """INSERT INTO far_session_contributions (event_id, request_id, model, peer_id,
                          start_block, end_block, tokens_processed, earnings, occurred_at)
                      VALUES (gen_random_uuid(), $1, 'm', 'p', $2, $3, 1, 0, now())"""
    bad = [
        (asyncpg.CheckViolationError, "INSERT INTO far_payment_batches (week, wallet) VALUES ('2026-48', 'w')", ()),
        (asyncpg.CheckViolationError, contribution, ("r1", 2, 2)),
        (asyncpg.ForeignKeyViolationError, contribution, ("nope", 0, 2)),
        (asyncpg.CheckViolationError, "INSERT INTO far_nodes (peer_id, state) VALUES ('p', 'bogus')", ()),
    ]
    for error, sql, args in bad:
        with pytest.raises(error):
            async with conn.transaction():  # a savepoint
                await conn.execute(sql, *args)
    await conn.execute("INSERT INTO far_payment_batches (week, wallet) VALUES ('2026-W48', 'w')")
    await conn.execute(contribution, "r1", 0, 2)
    with pytest.raises(asyncpg.UniqueViolationError):
        async with conn.transaction():
            await conn.execute(contribution, "r1", 0, 2)


def test_cli_migrate_status_rollback(empty_database_url: str) -> None:
    runner = CliRunner()
    args = ["--database-url", empty_database_url]
    result = runner.invoke(db_group, ["migrate", *args])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"applied {label}" for label in LABELS]
    result = runner.invoke(db_group, ["migrate", *args])
    assert result.output.splitlines() == ["database is up to date"]
    result = runner.invoke(db_group, ["status", *args])
    assert result.exit_code == 0 and "004_distributed_inference  applied" in result.output
    result = runner.invoke(db_group, ["rollback", "--to", "3", "--steps", "1", *args])
    assert result.exit_code != 0 and "mutually exclusive" in result.output
    result = runner.invoke(db_group, ["rollback", "--yes", *args])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"reverted {label}" for label in LABELS[::-1]]
