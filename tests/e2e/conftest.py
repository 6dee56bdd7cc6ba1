"""End-to-end tests run on the session-wide loopback swarm: the `swarm` fixture of tests/conftest.py
(tests/support/swarm.py), shared with the fault drills in tests/chaos."""
from tests.support.swarm import (  # noqa: F401
    DHT_PREFIX,
    HEARTBEAT_INTERVAL,
    NODE_BLOCKS,
    Swarm,
    heartbeat_args,
    wallet_of,
)
