"""Process supervision for development and tests: children in their own process groups, stopped by id.

A swarm process (DHT, Petals node) or a service forks helpers (p2pd, hivemind workers); each child runs in
its own process group so that stopping it stops them all, and the hivemind unix sockets its group had bound
are removed afterwards (members that die without cleaning up leave them behind). Nothing here kills by name.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


log = logging.getLogger(__name__)

_SOCKET_PATH = re.compile(r"^/tmp/hivemind-[^/]+\.sock$")


class SwarmProcessError(RuntimeError):
    """A swarm process exited or stalled before it reported ready."""


class ManagedProcess:
    """A swarm process in its own process group, with its output in a log file.

    `info` holds the key=value fields of its ready line (`maddr` for a DHT, `peer_id` and `blocks` for a node).
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.info: dict[str, str] = {}
        self._log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until stop()
        self._read_offset = self._log.tell()  # an earlier run's ready line in the same log must not count
        self._pending = b""
        # Hivemind sockets seen bound by the group; they outlive members that die without cleaning up.
        self._sockets: set[str] = set()
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def maddr(self) -> str:
        return self.info["maddr"]

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def wait_ready(self, prefix: str, timeout: float) -> dict[str, str]:
        """Wait for the line starting with `prefix`; on exit or timeout, stop the process and raise."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line_starting_with(prefix)
            if line is not None:
                self.info = dict(field.split("=", 1) for field in line[len(prefix):].split() if "=" in field)
                self._sockets |= _hivemind_sockets_of(_group_members(self.pid))
                return self.info
            exit_code = self.process.poll()
            if exit_code is not None or time.monotonic() > deadline:
                self.stop()
                reason = f"exited with code {exit_code}" if exit_code is not None else f"not ready in {timeout:.0f} s"
                raise SwarmProcessError(f"{self.name} {reason}; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def _next_line_starting_with(self, prefix: str) -> str | None:
        with open(self.log_path, "rb") as log:
            log.seek(self._read_offset)
            chunk = log.read()
        self._read_offset += len(chunk)
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line.startswith(prefix):
                return line
        return None

    def log_tail(self, max_bytes: int = 4000) -> str:
        return self.log_path.read_bytes()[-max_bytes:].decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the leader (it shuts its workers down cleanly), then SIGTERM and SIGKILL what is left of the
        group, and remove the hivemind sockets the group's processes had bound."""
        pgid = self.process.pid  # start_new_session made the leader its group's id
        self._sockets |= _hivemind_sockets_of(_group_members(pgid))
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for signum, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            members = _group_members(pgid)
            if not members:
                break
            self._sockets |= _hivemind_sockets_of(members)
            try:
                os.killpg(pgid, signum)
            except ProcessLookupError:
                break
            _wait_group_gone(pgid, grace)
        self.process.wait()
        for path in self._sockets:
            Path(path).unlink(missing_ok=True)
        self._log.close()


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _hivemind_sockets_of(pids: Sequence[int]) -> set[str]:
    """Paths of the /tmp/hivemind-*.sock unix sockets that these processes hold open."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    paths = set()
    with open("/proc/net/unix") as table:
        next(table)  # header
        for row in table:
            fields = row.split()
            if len(fields) >= 8 and fields[6] in inodes and _SOCKET_PATH.match(fields[7]):
                paths.add(fields[7])
    return paths


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the process group `process` leads (started with start_new_session: its pgid is its pid)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        process.send_signal(sig)


def terminate_group(process: subprocess.Popen, timeout: float, name: str) -> None:
    """SIGTERM the group `process` leads, SIGKILL it after `timeout` s; reaps the leader."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s pid %s ignored SIGTERM for %.0f s; killing it", name, process.pid, timeout)
            signal_group(process, signal.SIGKILL)
            process.wait(30)
    process.wait()


def pid_alive(pid: int) -> bool:
    """True while `pid` is a running process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
