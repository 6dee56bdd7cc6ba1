"""What the inference handler needs from the outside world besides the swarm, and no more (cosmicpython's ports).

Before it runs a request the handler asks `Reservations` for the reservation the gateway made for it, and runs it
only if the request keeps to it (farmesh/billing/acceptance.py `request_problem`): anyone who can write to the
requests topic can publish a well-formed request, so the reservation, not the event, is what is trusted. The
PostgreSQL adapter is consumers/inference/repository.py (`PostgresReservations`, reading far_reservations through
db/views/reservations.py); the unit tests use an in-memory one.
"""
from __future__ import annotations

from typing import Protocol

from db.views.reservations import Reservation


class Reservations(Protocol):
    """The gateway's reservations, as the worker sees them (read only)."""

    async def reservation(self, request_id: str) -> Reservation | None:
        """The reservation of `request_id` as it stands now (None: the gateway never reserved it)."""
        ...
