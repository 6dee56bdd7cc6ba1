"""A service stopped with SIGTERM or SIGINT (`kill PID`, Ctrl-C, a supervisor) runs its own clean-up before it
exits: `farmesh.runtime.serving.serve` returns after uvicorn's graceful shutdown. uvicorn itself raises the signal
again once it has served, which killed the process before the caller's `finally` (the worker's and the gateway's
Petals client, whose DHT process and p2pd were then left running).

Each case runs a real uvicorn server on a loopback port in a child process and signals that process alone.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent("""
    import asyncio, sys
    import uvicorn
    from fastapi import FastAPI
    from farmesh.runtime import serving

    async def main(upstream: bool) -> None:
        if upstream:  # uvicorn as it comes
            server = uvicorn.Server(uvicorn.Config(FastAPI(), host="127.0.0.1", port=0, log_config=None))
            task = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.05)
            print("probe ready", flush=True)
            serving_done = task
        else:
            serving_done = asyncio.create_task(serving.serve(FastAPI(), "127.0.0.1", 0, "probe"))
        try:
            await serving_done
        finally:
            print("cleaned up", flush=True)

    asyncio.run(main(sys.argv[1] == "upstream"))
    print("exited normally", flush=True)
""")


def run_and_signal(mode: str, signum: int) -> tuple[int, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("probe ready"), (first, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signum)  # the process alone, as `kill PID` does
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out.split("\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_returns_after_the_signal_and_the_callers_clean_up_runs(signum: int) -> None:
    code, lines = run_and_signal("serve", signum)
    assert code == 0 and "cleaned up" in lines and "exited normally" in lines, (code, lines)


def test_upstream_uvicorn_still_raises_the_signal_again_after_serving() -> None:
    """What `serving._Server` undoes: if this fails, uvicorn no longer re-raises and the override can go."""
    code, lines = run_and_signal("upstream", signal.SIGTERM)
    assert code == -signal.SIGTERM and "exited normally" not in lines, (code, lines)
