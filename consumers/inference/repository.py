"""PostgreSQL adapter of the inference handler's port (consumers/inference/ports.py `Reservations`)."""
from __future__ import annotations

import asyncpg

from db.views.reservations import Reservation, reservation


class PostgresReservations:
    """The worker's read of far_reservations, on a connection pool (one primary-key lookup per request)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def reservation(self, request_id: str) -> Reservation | None:
        return await reservation(self.pool, request_id)
