"""Network helpers every process uses: a free TCP port on an address."""
from __future__ import annotations

import socket


HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
