"""Running portside as a real process in tests: its log lines are events to wait on."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

WAIT = 20.0


class PortsideProcess:
    """``python -m portside ARGS`` with stderr read line by line in a thread (so the pipe never
    fills); ``lines`` holds every line read so far by ``wait_for``, ``count`` or ``text``."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 wrapper: Sequence[str] = (), **popen: Any) -> None:
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "portside", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})}, **popen)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = WAIT,
                 seen_too: bool = False) -> re.Match[str]:
        """The first log line from now on that matches ``pattern`` within ``timeout`` seconds
        (with ``seen_too``, also among the lines earlier calls already read past)."""
        regex = re.compile(pattern)
        if seen_too:
            for seen in self.lines:
                if match := regex.search(seen):
                    return match
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no log line matching {pattern!r}; log: {self.lines}") from None
            if line is None:
                self._queue.put(None)  # the end stays visible to later calls
                raise AssertionError(f"process ended before {pattern!r}; log: {self.lines}")
            self.lines.append(line)
            if match := regex.search(line):
                return match

    def _drain(self) -> None:
        """Move the lines read but not yet looked at into ``lines``, without waiting."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._queue.put(None)
                return
            self.lines.append(line)

    def count(self, text: str) -> int:
        """How many lines so far contain ``text``."""
        self._drain()
        return sum(text in line for line in self.lines)

    def text(self) -> str:
        self._drain()
        return "\n".join(self.lines)

    def ports(self) -> dict[str, int]:
        """Listening ports by policy, from the 'listening on' lines."""
        found: dict[str, int] = {}
        while len(found) < 2:
            match = self.wait_for(r"listening on [\d.]+:(\d+) \(([\w-]+)\)")
            found[match.group(2)] = int(match.group(1))
        return found

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = WAIT) -> int:
        """The exit status, once the process ended; the rest of stderr joins ``lines``."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        self._drain()
        return code

    def kill(self) -> None:
        """Kill it if it still runs, and release the pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        self._reader.join(WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def echo_once(port: int, payload: bytes = b"ping", host: str = "127.0.0.1") -> bytes:
    """One conversation: send ``payload``, half-close, return everything until EOF."""
    with socket.create_connection((host, port), timeout=WAIT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(4096):
            received += data
        return received
