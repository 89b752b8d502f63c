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
from collections.abc import Sequence
from typing import Any

WAIT = 20.0


class PortsideProcess:
    """``python -m portside ARGS`` with stderr read line by line in a thread."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 wrapper: Sequence[str] = (), **popen: Any) -> None:
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "portside", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
        """The first log line from now on that matches ``pattern`` (with ``seen_too``, also
        among the lines earlier waits already read past)."""
        regex = re.compile(pattern)
        if seen_too:
            for seen in self.lines:
                if match := regex.search(seen):
                    return match
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no log line matching {pattern!r}; log: {self.lines}") from None
            if line is None:
                raise AssertionError(f"process ended before {pattern!r}; log: {self.lines}")
            self.lines.append(line)
            if match := regex.search(line):
                return match

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
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        while (line := self._queue.get_nowait() if not self._queue.empty() else None) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)


def echo_once(port: int, payload: bytes = b"ping", host: str = "127.0.0.1") -> bytes:
    """One conversation: send ``payload``, half-close, return everything until EOF."""
    with socket.create_connection((host, port), timeout=WAIT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(4096):
            received += data
        return received
