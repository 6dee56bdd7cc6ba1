"""What the gateway's handlers need from the outside world, as narrow ports, and the production adapters.

The Submitter (producers.gateway.submit) and the native API only ever talk to these Protocols, so their rules
(reserve before publishing, publish once, refuse without side effects) are tested with in-memory fakes
(tests/unit/test_submitter.py); the adapters below are the only gateway code that knows asyncpg or Kafka.

- Accounts:  the caller's key and the money held for a request (PostgreSQL: far_api_keys, far_reserve).
             Refusals are farmesh.billing.accounts' errors (Unauthorized, InsufficientFunds, QueueFull,
             ParametersDiffer, DuplicateRequest, AlreadyRequested): the port's vocabulary, whoever implements it.
             Request ids here are the mesh's (farmesh.billing.accounts.mesh_request_id: the client's id scoped by
             its account), so an account only ever meets its own.
- Sessions:  a finished request as the ledger recorded it (db.views.sessions), by mesh request id.
- Publisher: the events this gateway writes: InferenceRequested (requests topic) and InferenceCancelled
             (control topic), keyed by request id so one request's events stay in order.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import asyncpg
from faststream.kafka import KafkaBroker

from db.views.sessions import fetch_session
from farmesh.billing import accounts
from farmesh.billing.accounts import Client, Reservation
from farmesh.kafka import messaging
from schemas import topics
from schemas.events import InferenceCancelled, InferenceRequested


class Accounts(Protocol):
    async def authenticate(self, authorization: str | None) -> Client:
        """The key's client; raises accounts.Unauthorized."""

    async def reserve(self, authorization: str | None, reservation: Reservation) -> Client:
        """Authenticate and hold max_tokens x price, keyed by request id, in one step; raises an AccountError
        (AlreadyRequested for the same account repeating the same request: nothing is held twice)."""

    async def release(self, request_id: str, reason: str) -> None:
        """Give back the hold of a request that was never queued."""


class Sessions(Protocol):
    async def fetch(self, request_id: str) -> dict[str, Any] | None:
        """The recorded session (db.views.sessions' shape), or None while the ledger has not recorded it."""


class Publisher(Protocol):
    async def request(self, event: InferenceRequested) -> None:
        """Queue a request for the workers; raises when the broker did not take it."""

    async def cancel(self, event: InferenceCancelled) -> None:
        """Tell the workers to stop a request."""


# --------------------------------------------------------------------------------------------- adapters

class PostgresAccounts:
    """Accounts and Sessions on the gateway's asyncpg pool (a getter: the pool is opened in the app's lifespan)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool

    async def authenticate(self, authorization: str | None) -> Client:
        return await accounts.authenticate(self._pool(), authorization)

    async def reserve(self, authorization: str | None, reservation: Reservation) -> Client:
        client, _held = await accounts.reserve(self._pool(), authorization, reservation)
        return client

    async def release(self, request_id: str, reason: str) -> None:
        await accounts.release(self._pool(), request_id, reason)

    async def fetch(self, request_id: str) -> dict[str, Any] | None:
        return await fetch_session(self._pool(), request_id)


class KafkaPublisher:
    """The gateway's events on its FastStream broker."""

    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker

    async def request(self, event: InferenceRequested) -> None:
        await messaging.publish(self._broker, topics.REQUESTS.name, event, event.request_id)

    async def cancel(self, event: InferenceCancelled) -> None:
        await messaging.publish(self._broker, topics.CONTROL.name, event, event.request_id)

    async def heartbeat(self, peer_id: str, body: bytes) -> None:
        """A provider's signed heartbeat, the bytes as the ingress received them (producers.gateway.heartbeat_ingress)."""
        await self._broker.publish(body, topics.HEARTBEATS.name, key=peer_id.encode("ascii"),  # type: ignore[attr-defined]
                                   headers={topics.EVENT_TYPE_HEADER: "node.heartbeat"})
