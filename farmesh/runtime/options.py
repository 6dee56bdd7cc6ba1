"""The command line's shared options: the FARMESH_* settings as flags, parsing helpers, and the operator
commands' database connection."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import click

from farmesh.runtime.errors import SettingError
from farmesh.runtime.settings import Settings

if TYPE_CHECKING:
    import asyncpg

# Seconds an operator command waits for the database to accept a connection (asyncpg's default is 60): a
# database that does not answer is reported (farmesh/runtime/errors.py) instead of leaving the operator waiting.
CONNECT_TIMEOUT = 10.0


# Flags shared by the services; each maps onto a Settings field of the same name.
_SETTING_FLAGS = {
    "kafka_bootstrap": click.option("--kafka-bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers [FARMESH_KAFKA_BOOTSTRAP]"),
    "broker": click.option("--broker", type=click.Choice(["noida", "kafka"]), help="Broker to start when no bootstrap is given: noida (embedded, default) or kafka (Apache Kafka from deploy/kafka) [FARMESH_BROKER]"),
    "database_url": click.option("--database-url", metavar="URL", help="PostgreSQL URL [FARMESH_DATABASE_URL]"),
    "initial_peers": click.option("--initial-peers", metavar="MADDRS", help="Our DHT bootstrap multiaddrs, comma separated [FARMESH_INITIAL_PEERS]"),
    "model": click.option("--model", metavar="DIR", help="Model directory [FARMESH_MODEL]"),
    "dht_prefix": click.option("--dht-prefix", help="DHT prefix of the model's blocks [FARMESH_DHT_PREFIX]"),
    "price_per_token": click.option("--price-per-token", metavar="FAR", help="Price per generated token [FARMESH_PRICE_PER_TOKEN]"),
    "node_timeout": click.option("--node-timeout", metavar="SECONDS", help="A node not heard from this long is offline [FARMESH_NODE_TIMEOUT]"),
    "heartbeat_max_skew": click.option("--heartbeat-max-skew", metavar="SECONDS", help="Refuse heartbeats this far from their log time [FARMESH_HEARTBEAT_MAX_SKEW]"),
    "registry_key": click.option("--registry-key", metavar="FILE", help="The registry's Ed25519 key (PEM) that signs its time-out decisions; default <data dir>/registry.key [FARMESH_REGISTRY_KEY]"),
    "registry_public_keys": click.option("--registry-public-keys", metavar="KEYS", help="Pinned registry public keys (base64, comma separated) whose time-out decisions are applied [FARMESH_REGISTRY_PUBLIC_KEYS]"),
}


def with_settings(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the named setting flags and pass a `settings` built from env + flags."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in names}
            overrides = {n: v for n, v in given.items() if v is not None}
            try:
                settings = Settings(**overrides)
            except ValueError as exc:
                raise click.UsageError(setting_problem(exc)) from None
            return fn(settings=settings, **kwargs)
        for name in reversed(names):
            wrapper = _SETTING_FLAGS[name](wrapper)
        return wrapper
    return decorate


# Settings whose value is never echoed back in an error (a URL's password, the admin token, key material).
_MAY_HOLD_SECRETS = frozenset({"database_url", "admin_token", "registry_key", "registry_public_keys"})


def setting_problem(exc: ValueError) -> str:
    """Settings that do not validate, in one line: which FARMESH_* variable (and flag) and why, never pydantic's
    multi-line report. The value is shown unless it may hold a secret (a URL's password, a key)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    problems = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        where = (f"FARMESH_{name.upper()}" + (f" / --{name.replace('_', '-')}" if name in _SETTING_FLAGS else "")
                 if name else "settings")
        value = error.get("input")
        shown = (f" (got {value!r})" if isinstance(value, str) and len(value) <= 80
                 and name not in _MAY_HOLD_SECRETS else "")
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}{'' if isinstance(value, str) and value in message else shown}")
    return "; ".join(problems)


def far_amount(value: str, param_hint: str | None = None) -> int:
    """A FAR amount given on the command line (exact, not negative), in base units; click.BadParameter (one line,
    exit 2) when it is not one."""
    from decimal import Decimal

    from schemas import money

    try:
        amount = Decimal(value.strip())
    except ArithmeticError:  # decimal.InvalidOperation, whose own text is a list of Python classes
        raise click.BadParameter(f"{value!r} is not an exact FAR amount (not a number, e.g. 2.5)",
                                 param_hint=param_hint) from None
    try:
        return money.to_base_units(amount)
    except (ArithmeticError, ValueError) as exc:
        raise click.BadParameter(f"{value!r} is not an exact FAR amount ({exc})", param_hint=param_hint) from None


def require_initial_peers(settings: Settings) -> None:
    """A swarm client (gateway, worker) starts only with our own DHT to join: Petals would otherwise join the
    public swarm (farmesh/swarm/petals_compat.py refuses that later, less clearly)."""
    if not settings.initial_peers:
        raise SettingError("no initial peers: pass --initial-peers or set FARMESH_INITIAL_PEERS "
                           "(the multiaddrs of our own DHT bootstrap peers)")


def flags_to_subcommand(ctx: click.Context) -> None:
    """For a group that is also a service (`farmesh ledger`, `farmesh payments`): flags given before a
    subcommand (`farmesh payments --database-url URL close ...`) become that subcommand's defaults."""
    given = {name: value for name, value in ctx.params.items()
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if given and ctx.invoked_subcommand:
        defaults = dict(ctx.default_map or {})
        defaults[ctx.invoked_subcommand] = {**given, **(defaults.get(ctx.invoked_subcommand) or {})}
        ctx.default_map = defaults


def parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO time like 2026-11-23T00:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@contextlib.asynccontextmanager
async def connection(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """One connection to the configured database for an operator command, closed afterwards."""
    import asyncpg

    conn = await asyncpg.connect(settings.require_database_url(), timeout=CONNECT_TIMEOUT)
    try:
        yield conn
    finally:
        await conn.close()
