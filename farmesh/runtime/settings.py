"""Configuration: one settings object, read from FARMESH_* environment variables.

CLI flags override individual fields (see farmesh.cli); every service gets the same names.
"""
from __future__ import annotations

import re
import socket
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from farmesh.runtime.errors import SettingError
from schemas import money
class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FARMESH_", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    # The broker `farmesh up` / `demo` start when FARMESH_KAFKA_BOOTSTRAP is unset: the embedded noida-db, or
    # Apache Kafka 4.4 from Maven Central jars (deploy/kafka; needs Java 17 and Maven: farmesh/dev/kafka.py).
    broker: Literal["noida", "kafka"] = "noida"
    # None means "no server configured": `farmesh up` then starts an embedded PostgreSQL.
    database_url: str | None = None
    # Multiaddrs of our own DHT bootstrap peers; never the public swarm.
    initial_peers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Where the weights are: a local model directory (or a hub name where a hub is reachable).
    # Unset: the tiny local model in <data_dir>/tiny-model, which `farmesh up` writes if missing.
    model: str | None = None
    # The model's name in the mesh: the DHT prefix its blocks are announced under (shared by every
    # server and client of one model), and the `model` of every request, session and contribution.
    dht_prefix: str = "farmesh-tiny"
    price_per_token: Decimal = Decimal("0.0001")
    # Per-model prices, "model=FAR,model=FAR" (FAR per generated token); unlisted models pay price_per_token.
    model_prices: Annotated[dict[str, Decimal], NoDecode] = Field(default_factory=dict)
    # Platform fee: the fraction (0..1) of each session's cost credited to the platform account.
    platform_fee: Decimal = Decimal(0)
    # Weekly payouts below this (FAR per wallet) carry over to the next batch.
    min_payout: Decimal = Decimal(0)
    # `farmesh payments` closes each ISO week's batch this many seconds after the week ended (late work of the
    # week is paid by the next batch).
    payments_close_grace: float = Field(default=3600.0, ge=0)
    topic_partitions: int = 6
    data_dir: Path = Path(".farmesh")
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    # Petals client timeouts: short so a dead node is noticed quickly on a local mesh.
    request_timeout: float = 30.0
    max_retries: int = 3
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    # Node registry: a live node not heard from for node_timeout seconds is declared offline; heartbeats
    # whose time is further than heartbeat_max_skew seconds from their log time are refused.
    node_timeout: float = Field(default=20.0, gt=0)
    heartbeat_max_skew: float = Field(default=60.0, gt=0)
    # The registry's Ed25519 key (PEM file) that signs its time-out decisions; unset: <data_dir>/registry.key,
    # created on the registry's first start. Only the registry may hold it (consumers/registry/decisions.py).
    registry_key: Path | None = None
    # Public keys (base64, comma separated) whose time-out decisions the registry and its rebuild apply; unset:
    # the public key of registry_key. Pinned, a rebuild elsewhere needs no private key, and a rotated key keeps
    # the old one's decisions valid.
    registry_public_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Gateway heartbeat ingress (POST /api/nodes/heartbeats): the largest heartbeat body (bytes), and per peer the
    # heartbeats per second it publishes beyond a burst (producers/gateway/heartbeat_ingress.py).
    heartbeat_max_bytes: int = Field(default=16384, ge=1024, le=1024 * 1024)
    heartbeat_rate: float = Field(default=2.0, gt=0, le=1000)
    heartbeat_burst: float = Field(default=10.0, ge=1, le=10000)
    # Provider node: payout wallet and seconds between heartbeats (`farmesh node`).
    wallet: str | None = None
    heartbeat_interval: float = Field(default=5.0, gt=0, le=300)
    # Inference worker: seconds between refreshes of the registry's online nodes it prefers to route through.
    route_refresh: float = Field(default=5.0, gt=0)
    # Generations one inference worker runs at once (each takes one partition of the requests topic, so
    # all workers together run at most topic_partitions at once).
    worker_concurrency: int = Field(default=3, ge=1, le=64)
    # Longest fetch wait (ms) of the consumers on a request's path to its first token (worker requests and
    # cancellations, gateway replies). Apache Kafka long-polls, answering as soon as a record arrives, so there
    # this only bounds an idle consumer's fetch rate: 100-500 is right. The dev broker (noida-db) answers an
    # empty fetch at once and the client then sleeps out the wait (farmesh.kafka.messaging), so on it this wait is
    # added latency: 3 ms keeps the gateway within ~15 ms of a direct Petals client, for ~10% of a core per
    # idle consumer.
    latency_fetch_wait_ms: int = Field(default=3, ge=1, le=5000)
    # Gateway: its id names its own reply topic (farmesh.inference.replies.<id>); unset, host and port.
    gateway_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")
    # Requests of one model accepted (over every gateway) and not finished yet: beyond this, 429.
    max_pending_requests: int = Field(default=64, ge=1)
    # Seconds a client is told to wait (Retry-After) when the model's queue is full.
    retry_after: int = Field(default=2, ge=1, le=3600)
    # A request not started by a worker this many seconds after it was accepted is never run (expired,
    # charged nothing); clients may ask for less or more, up to max_request_deadline.
    request_deadline: float = Field(default=120.0, gt=0)
    max_request_deadline: float = Field(default=3600.0, gt=0)
    # Gateway: the largest request body it reads (bytes); a larger one is refused with 413 as it arrives. 2 MiB
    # holds any valid request: 100,000 prompt characters, even each written as a \u escape pair (12 bytes).
    max_request_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # Gateway: the operator's token for /api/admin/ (sent as `Authorization: Bearer`, compared in constant time);
    # unset, the admin API is off (404). At least 16 characters: it guards every account.
    admin_token: SecretStr | None = Field(default=None, min_length=16, max_length=512)

    @field_validator("admin_token", mode="before")
    @classmethod
    def _admin_token_unset_when_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("initial_peers", mode="before")
    @classmethod
    def _split_peers(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.replace(",", " ").split() if p.strip()]
        return value

    @field_validator("registry_public_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.replace(",", " ").split() if k.strip()]
        return value

    @field_validator("price_per_token")
    @classmethod
    def _price_is_exact(cls, value: Decimal) -> Decimal:
        money.to_base_units(value)  # raises on prices finer than one base unit
        return value

    @field_validator("model_prices", mode="before")
    @classmethod
    def _split_prices(cls, value: object) -> object:
        if isinstance(value, str):
            prices = {}
            for item in value.replace(";", ",").split(","):
                if not item.strip():
                    continue
                model, sep, price = item.partition("=")
                if not sep or not model.strip():
                    raise ValueError(f"model prices are model=FAR pairs, got {item!r}")
                prices[model.strip()] = price.strip()
            return prices
        return value

    @field_validator("model_prices")
    @classmethod
    def _prices_are_exact(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for price in value.values():
            money.to_base_units(price)
        return value

    @field_validator("platform_fee")
    @classmethod
    def _fee_is_a_fraction(cls, value: Decimal) -> Decimal:
        from farmesh.billing.pricing import fee_rate_units

        fee_rate_units(value)  # 0..1, at most 18 decimals
        return value

    @field_validator("min_payout")
    @classmethod
    def _min_payout_is_exact(cls, value: Decimal) -> Decimal:
        money.to_base_units(value)
        return value

    def price_for(self, model: str) -> Decimal:
        """FAR per generated token of `model`, fixed on each request when the gateway accepts it."""
        return self.model_prices.get(model, self.price_per_token)

    @property
    def model_dir(self) -> str:
        return self.model or str(self.data_dir / "tiny-model")

    @property
    def registry_key_path(self) -> Path:
        return self.registry_key or self.data_dir / "registry.key"

    @property
    def model_name(self) -> str:
        return self.dht_prefix

    @property
    def gateway_name(self) -> str:
        """This gateway's id: settings.gateway_id, else <host>-<port> (stable over restarts)."""
        if self.gateway_id:
            return self.gateway_id
        host = re.sub(r"[^A-Za-z0-9.\-]", "-", socket.gethostname()).strip("-.") or "gateway"
        return f"{host[:80]}-{self.gateway_port}"

    @property
    def price_base_units(self) -> int:
        return money.to_base_units(self.price_per_token)

    @property
    def min_payout_base_units(self) -> int:
        return money.to_base_units(self.min_payout)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SettingError("FARMESH_DATABASE_URL is not set (farmesh up starts an embedded PostgreSQL for you)")
        return self.database_url
